"""The run dashboard (`llama-lora dashboard`): a local web page over the runs directory."""
