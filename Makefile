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

# a 14-run Optuna study (GKA ablations + baselines, 2 lrs each) with 2 workers, then its report;
# running it again resumes (and then only rewrites the report)
demo: $(STAMP)
	$(LAB) sweep --config configs/sweeps/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check lab tasks kernels sweeps tests

clean-venv:
	rm -rf $(VENV)
