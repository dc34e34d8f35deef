# One-command set-up on a fresh machine with only Python: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanogemma generate "Once upon a time" --max-new-tokens 48

# The chat page's test drives a real headless Chromium (Debian's package; CI runs as root on a fresh machine).
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: $(STAMP) chromium
	$(VENV)/bin/ruff check nanogemma tests bench scripts
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check nanogemma tests bench scripts

bench: $(STAMP)
	$(VENV)/bin/nanogemma bench --compare transformers

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
