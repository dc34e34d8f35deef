# One-command set-up on a fresh machine with only Python: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# llama.cpp itself checks `nanogemma export --to gguf` in the tests, through llama-cpp-python, which compiles
# llama.cpp (minutes). So its wheel is built once per machine into a cache outside the repository and later
# venvs install it from there. GGML_NATIVE=OFF with AVX2/FMA/F16C: one wheel that runs on every CPU kind this
# project meets (AVX2-only Zen 3, AVX-512 Zen 5, Intel with AMX), not one tuned to the CPU that built it.
LLAMA_CPP_VERSION := 0.3.36
WHEEL_CACHE ?= $(HOME)/.cache/nanogemma-wheels
LLAMA_WHEELS := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-avx2
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
LLAMA_STAMP := $(VENV)/.llama-cpp-python-$(LLAMA_CPP_VERSION)
LLAMA_INSTALL := $(PY) -m pip install --quiet --no-index --no-deps --find-links $(LLAMA_WHEELS) \
	llama-cpp-python==$(LLAMA_CPP_VERSION)

.PHONY: demo test test-avx2 cpu lint bench clean llama-cpp chromium

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

# A cached wheel that installs is used; otherwise (first run, or another Python) it is built, then cached.
$(LLAMA_STAMP): $(STAMP)
	@$(LLAMA_INSTALL) 2>/dev/null || { \
	  command -v c++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++; }; \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once, into $(LLAMA_WHEELS) (minutes)"; \
	  tmp=$$(mktemp -d) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PY) -m pip wheel --quiet --no-deps --no-binary llama-cpp-python -w $$tmp \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  mkdir -p $(LLAMA_WHEELS) && mv $$tmp/*.whl $(LLAMA_WHEELS)/ && rm -rf $$tmp && \
	  $(LLAMA_INSTALL); }
	touch $@

llama-cpp: $(LLAMA_STAMP)

test: $(STAMP) $(LLAMA_STAMP) chromium
	$(VENV)/bin/ruff check nanogemma tests bench scripts
	$(PY) -m pytest -q

# The AVX2 kernels on an AVX-512 machine: PyTorch's own (ATen), oneDNN's, fbgemm's (int8) and XLA's (JAX)
# each pick by instruction set; these variables cap all four, so an AVX-512 machine runs what an AVX2-only
# CPU (such as AMD Zen 3) runs. The suite must pass both ways.
# torch.compile's on-disk kernel cache does not key on ATEN_CPU_CAPABILITY: a kernel compiled uncapped and
# reused capped gave NaN losses (test_compiled_training_step_matches_eager), so the capped run has its own.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
             XLA_FLAGS=--xla_cpu_max_isa=AVX2 TORCHINDUCTOR_CACHE_DIR=$(HOME)/.cache/nanogemma-inductor-avx2

test-avx2: $(STAMP) $(LLAMA_STAMP) chromium
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
