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

# The demo: generate synthetic raw datasets in all four layouts, shard every split on local Ray,
# then re-read every shard. Later stages (train, evaluate, register) join as they land.
demo: $(STAMP)
	$(MASKDINO) make-synthetic $(DEMO)/raw --train-images 48 --val-images 16
	$(MASKDINO) shard --config configs/data/demo_coco_instances.yaml --splits train,val source.root=$(DEMO)/raw/coco output=$(DEMO)/shards/coco_instances
	$(MASKDINO) shard --config configs/data/demo_coco_panoptic.yaml --splits train,val source.root=$(DEMO)/raw/coco output=$(DEMO)/shards/coco_panoptic
	$(MASKDINO) shard --config configs/data/demo_ade20k.yaml --splits train,val source.root=$(DEMO)/raw/ADEChallengeData2016 output=$(DEMO)/shards/ade20k
	$(MASKDINO) shard --config configs/data/demo_objects365_v2.yaml --splits train,val source.root=$(DEMO)/raw/objects365_v2 output=$(DEMO)/shards/objects365_v2
	for m in $(DEMO)/shards/*/*/manifest.json; do $(MASKDINO) verify-shards $$m || exit 1; done
	$(MASKDINO) model-info configs/model/tiny_instance.yaml
	$(MASKDINO) model-info configs/model/r50_instance.yaml
	@echo "Demo done: raw synthetic datasets in $(DEMO)/raw, WebDataset shards with manifests and rejects in $(DEMO)/shards/<dataset>/<split>; the tiny and R50 Mask DINO models described above."

clean-demo:
	rm -rf $(DEMO)
