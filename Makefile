# Two commands a new user needs: `make test` and `make demo`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LAB := $(VENV)/bin/lab

.PHONY: test demo lint clean-venv

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check lab tasks kernels sweeps tests
	$(VENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(LAB) train --config configs/demo.yaml --config configs/demo/attention.yaml
	$(LAB) train --config configs/demo.yaml --config configs/demo/gka.yaml
	$(LAB) train --config configs/demo.yaml --config configs/demo/mamba2.yaml
	$(LAB) runs demo

lint: $(STAMP)
	$(VENV)/bin/ruff check lab tasks kernels sweeps tests

clean-venv:
	rm -rf $(VENV)
