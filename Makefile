# cancernet: make setup | make demo | make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic
DEMO_SLIDES := data/synthetic_slides

.PHONY: setup demo test test-fast test-other-cpu lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	# the package itself, editable, with the `cancernet` console script (its dependencies are installed above)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(DEMO_DATA)/train_labels.csv: | $(STAMP)
	$(PY) -m cancernet synth $(DEMO_DATA) --n-train 3000 --n-test 200 --seed 0

$(DEMO_SLIDES)/slides.csv: | $(STAMP)
	$(PY) -m cancernet synth-slides $(DEMO_SLIDES) --n 2 --rows 36 --cols 48 --seed 0

demo: $(STAMP) $(DEMO_DATA)/train_labels.csv $(DEMO_SLIDES)/slides.csv
	$(PY) train_ddp.py --config configs/demo.yaml
	# the trained model over two synthetic slides: heatmaps, slide and cell AUC (runs/demo/slides/)
	$(PY) -m cancernet evaluate-slides --checkpoint runs/demo/checkpoints/best.pt --slides $(DEMO_SLIDES)/slides \
	    --labels $(DEMO_SLIDES)/slides.csv --masks $(DEMO_SLIDES)/masks --mask-downsample 16 --out runs/demo/slides

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# the fast tier as a CPU without AVX-512/AMX kernels and without native bf16 computes it (CI runs
# both): a test tuned to one CPU's numerics fails here before it fails on another machine
test-other-cpu: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 CANCERNET_CPU_BF16=0 $(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs/demo $(DEMO_DATA) $(DEMO_SLIDES)
