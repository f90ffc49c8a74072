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
# re-read every shard, pretrain the tiny model detection-only on Objects365, fine-tune it for instances,
# evaluate and draw predictions. Registration joins with the orchestration layer.
demo: $(STAMP)
	$(MASKDINO) make-synthetic $(DEMO)/raw --train-images 48 --val-images 16 --o365-categories 365
	$(MASKDINO) shard --config configs/data/demo_coco_instances.yaml --splits train,val source.root=$(DEMO)/raw/coco output=$(DEMO)/shards/coco_instances
	$(MASKDINO) shard --config configs/data/demo_coco_panoptic.yaml --splits train,val source.root=$(DEMO)/raw/coco output=$(DEMO)/shards/coco_panoptic
	$(MASKDINO) shard --config configs/data/demo_ade20k.yaml --splits train,val source.root=$(DEMO)/raw/ADEChallengeData2016 output=$(DEMO)/shards/ade20k
	$(MASKDINO) shard --config configs/data/demo_objects365_v2.yaml --splits train,val source.root=$(DEMO)/raw/objects365_v2 output=$(DEMO)/shards/objects365_v2
	for m in $(DEMO)/shards/*/*/manifest.json; do $(MASKDINO) verify-shards $$m || exit 1; done
	$(MASKDINO) model-info configs/model/tiny_instance.yaml
	$(MASKDINO) model-info configs/model/r50_instance.yaml
	$(MASKDINO) train configs/train/tiny_o365_pretrain.yaml run_dir=$(DEMO)/runs/tiny_o365_pretrain data.manifest=$(DEMO)/shards/objects365_v2/train/manifest.json schedule.max_steps=20 checkpoint.every_steps=10
	$(MASKDINO) train configs/train/tiny_instance.yaml run_dir=$(DEMO)/runs/tiny_instance data.manifest=$(DEMO)/shards/coco_instances/train/manifest.json init_from=$(DEMO)/runs/tiny_o365_pretrain/model
	$(MASKDINO) evaluate $(DEMO)/shards/coco_instances/val/manifest.json --model $(DEMO)/runs/tiny_instance/model --output $(DEMO)/eval/tiny_instance --min-size 0
	$(MASKDINO) predict $$(ls $(DEMO)/raw/coco/val2017/*.jpg | head -2) --model $(DEMO)/runs/tiny_instance/model --output $(DEMO)/predictions --min-size 0 --kinds instances --score-threshold 0.3
	@echo "Demo done: raw synthetic datasets in $(DEMO)/raw; WebDataset shards with manifests and rejects in $(DEMO)/shards/<dataset>/<split>; a tiny detection-only Objects365 pretrain and an instance fine-tune from it in $(DEMO)/runs (checkpoints/, metrics.jsonl, model/); its evaluation in $(DEMO)/eval/tiny_instance/report.json; pictures in $(DEMO)/predictions."

clean-demo:
	rm -rf $(DEMO)
