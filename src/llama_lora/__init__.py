"""llama-lora: fine-tune Llama-family instruct models with LoRA and DoRA adapters."""

__version__ = "0.1.0"
