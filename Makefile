# One-command set-up on a fresh machine with only Python: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-avx2 cpu lint bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanogemma generate "Once upon a time" --max-new-tokens 48

test: $(STAMP)
	$(VENV)/bin/ruff check nanogemma tests bench scripts
	$(PY) -m pytest -q

# The AVX2 kernels on an AVX-512 machine: PyTorch's own (ATen), oneDNN's, fbgemm's (int8) and XLA's (JAX)
# each pick by instruction set; these variables cap all four, so an AVX-512 machine runs what an AVX2-only
# CPU (such as AMD Zen 3) runs. The suite must pass both ways.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
             XLA_FLAGS=--xla_cpu_max_isa=AVX2

test-avx2: $(STAMP)
	$(AVX2_ONLY) $(PY) -m nanogemma.machine
	$(AVX2_ONLY) $(PY) -m pytest -q

cpu: $(STAMP)
	$(PY) -m nanogemma.machine

lint: $(STAMP)
	$(VENV)/bin/ruff check nanogemma tests bench scripts

bench: $(STAMP)
	$(VENV)/bin/nanogemma bench --compare transformers

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
