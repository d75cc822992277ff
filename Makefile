# Two commands do all the set-up on a fresh machine (Python 3.11, gcc, optionally nvcc):
#   make demo   creates .venv, installs torch + the package with its compiled kernels, runs `nvlm demo`
#   make test   the same set-up, then the whole test suite
# Both are idempotent: stamps skip what is already done, and the extension build is incremental (ninja).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.14.1
PYTEST_ARGS ?=

.PHONY: demo test build lint bench clean

$(VENV)/.stamp-deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.14.1's CUDA build also runs on CPU, brings triton, and lets the CUDA extension build here.
	$(PIP) install -q "$(TORCH)" numpy ninja "setuptools>=64" wheel
	$(PIP) install -q safetensors tokenizers pillow tqdm pytest hypothesis "transformers>=4.50" ruff \
	    pytest-benchmark matplotlib bitsandbytes
	touch $@

# --no-build-isolation: an isolated build env would install a second torch and link against it (build_notes.md).
# The flock serialises concurrent builds in one checkout.
$(VENV)/.stamp-install: $(VENV)/.stamp-deps setup.py
	flock .build.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.stamp-install
	flock .build.lock $(PY) setup.py -q build_ext --inplace

demo: build
	$(VENV)/bin/nvlm demo

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-deps
	$(VENV)/bin/ruff check nvlm nvlm_kernels bench tests

bench: build
	$(VENV)/bin/nvlm bench --quick

clean:
	rm -rf build nvlm_kernels/_C*.so *.egg-info $(VENV)
