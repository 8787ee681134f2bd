# cancernet: make setup | make demo | make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic
DEMO_SLIDES := data/synthetic_slides

.PHONY: setup demo test test-docs test-fast test-other-cpu lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	# the package itself, editable, with the `cancernet` console script (its dependencies are installed above)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# synthetic patches and slides (made once), a CPU training run, the model over the slides (cancernet demo)
demo: $(STAMP)
	$(PY) -m cancernet demo --data-dir $(DEMO_DATA) --slides-dir $(DEMO_SLIDES) --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not docs" tests

# README's and docs/SLIDES.md's shell blocks as written, in a fresh copy after `make demo` (minutes)
test-docs: $(STAMP)
	$(PY) -m pytest -q -m docs tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not docs" tests

# the fast tier as a CPU without AVX-512/AMX kernels and without native bf16 computes it (CI runs
# both): a test tuned to one CPU's numerics fails here before it fails on another machine
test-other-cpu: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 CANCERNET_CPU_BF16=0 $(PY) -m pytest -q -m "not slow and not docs" tests

clean:
	rm -rf runs/demo runs/mil_demo $(DEMO_DATA) $(DEMO_SLIDES) data/slides demo_slides demo_feats demo_dx \
	    heatmaps heatmaps_tta heatmaps_qupath preds.csv exported
