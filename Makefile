# README's two commands: `make demo` (train the tiny InternLM2 on sample ftdp data)
# and `make test` (the whole CPU test-suite).  Both bootstrap .venv on their own.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp changes with the pins, so editing them re-runs the install.
STAMP := $(VENV)/.installed-$(shell (cat requirements/ci.txt requirements/ci-lock.txt pyproject.toml; grep -E '^(BITSANDBYTES|DEEPSPEED) ' Makefile) | sha1sum | cut -c1-12)
# A regular (not editable) install: editable installs do not get xtuner-patch.pth,
# the auto-import behind `XTUNER_PATCH=1 xtuner train`.  Reinstalled when sources change.
PKG_STAMP := $(VENV)/.package-installed
PKG_SOURCES := $(shell find kernels xtuner_patch -name '*.py' -o -name '*.c') setup.py pyproject.toml \
	xtuner-patch.pth _xtuner_patch_autoload.py
DEMO := .cache/demo
BITSANDBYTES := 0.45.5
DEEPSPEED := 0.19.6

.PHONY: venv demo test bench compile-check gpu-check gpu-wheels clean

venv: $(PKG_STAMP)

$(STAMP): requirements/ci.txt requirements/ci-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/ci.txt -c requirements/ci-lock.txt
	# deepspeed builds from source; with no ops compiled it needs only torch, installed above.
	DS_BUILD_OPS=0 $(PY) -m pip install -q "deepspeed==$(DEEPSPEED)" -c requirements/ci-lock.txt
	# xtuner 0.2.0 pins bitsandbytes 0.45.0, which imports triton.ops (gone since triton
	# 3.2): PEFT then cannot build a LoRA layer.  0.45.5 imports; same API.
	$(PY) -m pip install -q --no-deps "bitsandbytes==$(BITSANDBYTES)"
	rm -f $(VENV)/.installed-*
	touch $@

$(PKG_STAMP): $(STAMP) $(PKG_SOURCES)
	$(PY) -m pip install -q --no-deps --no-build-isolation --force-reinstall .
	# The compiled ftdp line reader in the checkout too: the tests import the checkout.
	$(PY) setup.py -q build_ext --inplace
	rm -rf build xtuner_patch.egg-info
	touch $@

$(DEMO)/tiny-internlm2/config.json: $(PKG_STAMP) xtuner_patch/fixtures/model.py
	$(PY) -m xtuner_patch.cli make-tiny-model $(DEMO)/tiny-internlm2 --overwrite

$(DEMO)/ftdp/.complete: $(PKG_STAMP) xtuner_patch/fixtures/ftdp.py
	rm -rf $(DEMO)/ftdp
	$(PY) -m xtuner_patch.cli make-sample-data $(DEMO)/ftdp
	touch $@

demo: $(DEMO)/tiny-internlm2/config.json $(DEMO)/ftdp/.complete
	$(VENV)/bin/xtuner-patch train configs/internlm2_tiny_ftdp_cpu.py --work-dir $(DEMO)/work

# pytest-xdist: two workers on the 2-core CI machine, at most 4 elsewhere (the e2e tests
# start 2-4 training processes each).
test: $(PKG_STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4

bench: $(PKG_STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only

# On the GPU host (system python3 with torch + triton; no venv, no network).
# Every kernel through the real GPU compiler for sm_90, offline (no GPU needed).
compile-check: $(PKG_STAMP)
	env -u TRITON_INTERPRET $(PY) scripts/compile_check.py

gpu-check:
	bash scripts/gpu_check.sh

# Here, before a GPU run: the packages the GPU host lacks, as cp312 wheels, and a
# DeepSpeed wheel built without compiled ops (PyPI has its source only).
gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl -r requirements/gpu-wheels.txt
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(DEEPSPEED)" -w .whl

clean:
	rm -rf $(VENV) .cache .pytest_cache .benchmarks
