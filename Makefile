# The two commands a new user runs: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PYTHON ?= python3
# CPU machines pin the CPU wheel of torch; on a GPU machine: make install CONSTRAINTS=constraints/gpu.txt
CONSTRAINTS ?= constraints/cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OFFLINE := HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: install demo test test-all clean-demo

$(STAMP): pyproject.toml $(CONSTRAINTS) tools/postinstall.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	$(PY) tools/postinstall.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/scaling run studies/examples/quickstart.yaml

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

# every test, slow and benchmark ones included (GPU/cluster ones skip without the hardware)
test-all: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -m "" $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/quickstart
