# Every target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A machine without a GPU: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs the CPU
# builds of torch and torchvision first, without the CUDA libraries (4.1 GB of a 6.4 GB .venv).
TORCH_INDEX ?=

.PHONY: demo demo-family test test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/finetune-compare experiment=demo trainer.enable_progress_bar=false

demo-family: $(STAMP)
	$(VENV)/bin/finetune-compare experiment=demo "compare.models=[lite0,lite1,lite2]" "compare.policies=[frozen,full]" \
		trainer.enable_progress_bar=false

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m ''

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
