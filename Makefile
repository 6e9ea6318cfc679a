# Each target makes the environment it needs when it is missing: `make demo` and `make test` work on a
# fresh clone. The dev/test environment is .venv (torch pinned to the local CPU wheel 2.13.0).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graphopt-installed
MODELS := models/build/.built
PYTEST_WORKERS ?= 2

.PHONY: all venv models demo test bench clean train-env test-tf

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

models: $(MODELS)

$(MODELS): models/build.py $(STAMP)
	$(PY) models/build.py --out models/build
	touch $@

demo: $(MODELS)
	mkdir -p out
	$(VENV)/bin/graphopt run models/build/digits_cnn.onnx --passes cleanup \
	  --data models/build/digits_cnn_calib.npz --eval-data models/build/digits_cnn_test.npz \
	  --max-accuracy-drop 0.5 --latency-batch 1,8 \
	  -o out/digits_cnn.opt.onnx --report out/digits_cnn.report.json --html out/digits_cnn.report.html

# TensorFlow (tensorflow-cpu + tf2onnx, ~1.8 GB) lives in its own environment so the main one stays small.
VENV_TF := .venv-tf
STAMP_TF := $(VENV_TF)/.graphopt-installed

$(STAMP_TF): pyproject.toml
	test -x $(VENV_TF)/bin/python || $(PYTHON) -m venv $(VENV_TF)
	$(VENV_TF)/bin/python -m pip install -q --upgrade pip
	$(VENV_TF)/bin/python -m pip install -q -e '.[tf]' pytest
	touch $@

test-tf: $(STAMP_TF) $(MODELS)
	$(VENV_TF)/bin/python -m pytest -q tests/test_export_tf.py

train-env: $(STAMP)
	$(VENV)/bin/graphopt setup-train

test: $(MODELS) train-env test-tf
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

bench: $(MODELS) train-env
	for b in quant_vs_ort prune distill partition lowrank fp16 big_model tune; do test -f benchmarks/$$b.py && $(PY) benchmarks/$$b.py || exit 1; done
	$(PY) benchmarks/collect.py

clean:
	rm -rf out models/build .pytest_cache
