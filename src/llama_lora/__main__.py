from llama_lora.cli import main

main()
