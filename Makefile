# make install      create .venv here and install requirements.txt (CPU TensorFlow)
# make install-gpu  the same with tensorflow[and-cuda] (NVIDIA GPU, Linux)
# make test         run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TF_GPU := tensorflow[and-cuda]==2.21.0

.PHONY: install install-gpu test

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet -r requirements.txt

install-gpu: $(PY)
	grep -v '^tensorflow-cpu' requirements.txt > $(VENV)/requirements-gpu.txt
	$(PY) -m pip install --quiet "$(TF_GPU)" -r $(VENV)/requirements-gpu.txt

test:
	$(PY) -m pytest -q tests
