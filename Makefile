# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and install the project with its test dependencies
# (torch + torchvision come from the package registry; see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MASKDINO := $(VENV)/bin/maskdino
STAMP := $(VENV)/.installed
DEMO ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv test demo clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The demo: generate synthetic raw datasets in all four layouts, then the whole pipeline on local Ray
# (shard, pretrain detection-only on Objects365, fine-tune instance / panoptic / semantic, evaluate,
# register in MLflow), then draw the instance champion's predictions.
demo: $(STAMP)
	$(MASKDINO) make-synthetic $(DEMO)/raw --train-images 48 --val-images 16 --o365-categories 365
	$(MASKDINO) run configs/pipeline/demo.yaml run_root=$(DEMO)/pipeline
	MLFLOW_TRACKING_URI=sqlite:///$(abspath $(DEMO))/pipeline/mlflow.db $(MASKDINO) predict $$(ls $(DEMO)/raw/coco/val2017/*.jpg | head -2) --model models:/maskdino-demo-instance@champion --output $(DEMO)/predictions --min-size 0 --kinds instances --score-threshold 0.3
	@echo "Demo done: raw synthetic datasets in $(DEMO)/raw; every stage's output in $(DEMO)/pipeline/stages/<stage>/<key>/; MLflow in $(DEMO)/pipeline/mlflow.db (mlflow ui --backend-store-uri sqlite:///$(abspath $(DEMO))/pipeline/mlflow.db); the instance champion's pictures in $(DEMO)/predictions."

clean-demo:
	rm -rf $(DEMO)
