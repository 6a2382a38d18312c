# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs first (torch and torchvision pinned as the CPU machines can install them).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.featinv-installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test check test-slow demo bench lint clean

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet setuptools wheel "pybind11>=2.12" "cmake>=3.18"
	$(PIP) install --quiet --no-build-isolation -e ".[test,dev,sd,metrics]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

check: $(STAMP)  # the edit-test loop: everything but the tests marked heavy (tests/conftest.py)
	$(PY) -m pytest -q -m "not heavy"

test-slow: $(STAMP)
	$(PY) -m pytest -q --runslow

demo: $(STAMP)
	$(VENV)/bin/featinv demo

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

lint: $(STAMP)
	$(VENV)/bin/ruff check featinv kernels tests benchmarks

clean:
	rm -rf build *.egg-info featinv/_C*.so
