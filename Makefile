# make install      create .venv here and install requirements.txt (CPU TensorFlow)
# make install-gpu  the same with tensorflow[and-cuda] (NVIDIA GPU, Linux)
# make test         run the test suite (what CI runs)
# make demo         train a light model on the built-in synthetic dataset, then test it
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TF_GPU := tensorflow[and-cuda]==2.21.0

# The demo: light model, 32 px (n_dis 4 is the deepest critic 32 px allows), ch 16,
# 1500 steps of batch 4 at lr 2e-4 (at batch 1 and lr 1e-4 the translations are still noise
# after ten minutes); about ten minutes on 2 CPU cores. Every other flag keeps the
# original's default. The test phase then prints the demo score.
DEMO_FLAGS := --dataset demo --light True --img_size 32 --n_dis 4 --ch 16 \
	--batch_size 4 --lr 0.0002 --epoch 6 --iteration 250 --print_freq 250 --save_freq 250 --seed 1

.PHONY: install install-gpu test demo

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet -r requirements.txt

install-gpu: $(PY)
	grep -v '^tensorflow-cpu' requirements.txt > $(VENV)/requirements-gpu.txt
	$(PY) -m pip install --quiet "$(TF_GPU)" -r $(VENV)/requirements-gpu.txt

test:
	$(PY) -m pytest -q tests

demo:
	$(PY) main.py --phase train $(DEMO_FLAGS)
	$(PY) main.py --phase test $(DEMO_FLAGS)
