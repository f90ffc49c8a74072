"""Run configs (configs/train/*.yaml): each loads as `maskdino train` reads it, carries the label set, loss
mode, augmentation and schedule of its recipe (docs/model.md#training-recipe; the O365 choices documented in the files),
steps 16 images on the world size its header documents, and the tiny ones build. No training here."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from cli import main
from core.config import ConfigError
from core.storage import Storage
from data_prep.synthetic import SyntheticSpec, make_synthetic
from pipeline.model_tools import build_model, load_model_config
from pipeline.parallelize import param_groups
from pipeline.train_config import TrainConfig, load_train_config
from pipeline.transforms import AugConfig

TRAIN = Path("configs/train")
CONFIGS = sorted(TRAIN.glob("*.yaml"))
TINY = [p for p in CONFIGS if p.stem.startswith("tiny_")]
FULL = [p for p in CONFIGS if not p.stem.startswith("tiny_")]

OFFICIAL_BATCH = 16  # IMS_PER_BATCH, total over all GPUs
COCO_TRAIN_IMAGES = 118_287
COCO_50EP = (368_750, [327_778, 355_092])
ADE_160K = (160_000, [135_000, 150_000])

# name -> (num_classes, mask_losses, augmentation recipe)
EXPECTED = {
    "r50_instance": (80, True, "lsj"),
    "r50_panoptic": (133, True, "lsj"),
    "r50_semantic": (150, True, "ade_semantic"),
    "r50_o365_pretrain": (365, False, "resize"),
    "swinl_instance": (80, True, "lsj"),
    "swinl_panoptic": (133, True, "lsj"),
    "swinl_semantic": (150, True, "ade_semantic"),
    "swinl_o365_pretrain": (365, False, "resize"),
    # the tiny ones carry the label sets of the synthetic demo data (`make demo`) they point at
    "tiny_instance": (8, True, "lsj"),
    "tiny_panoptic": (14, True, "lsj"),
    "tiny_semantic": (150, True, "ade_semantic"),
    "tiny_o365_pretrain": (365, False, "resize"),
}


def load(name: str, *overrides: str) -> TrainConfig:
    return load_train_config(TRAIN / f"{name}.yaml", list(overrides))


def documented_world_size(path: Path) -> int:
    """The `# world_size: N` line of the config's header comment: the GPU count its batch settings assume."""
    found = re.findall(r"^# world_size: (\d+)\b", path.read_text(), flags=re.MULTILINE)
    assert len(found) == 1, f"{path} must document its world size once as '# world_size: N'"
    return int(found[0])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_train_config_loads_and_has_expectations(path):
    cfg = load_train_config(path)
    assert path.stem in EXPECTED, f"add {path.stem} to EXPECTED"
    assert cfg.run_dir == f"runs/{path.stem}"
    assert cfg.data.manifest.endswith("/train/manifest.json")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_label_set_loss_mode_and_recipe(name):
    cfg = load(name)
    num_classes, mask_losses, recipe = EXPECTED[name]
    assert cfg.model.num_classes == num_classes
    assert cfg.model.loss.mask_losses is mask_losses
    assert cfg.data.aug.recipe == recipe
    if "panoptic" in name:  # thing classes are the first contiguous ids, as the manifests order them
        things = cfg.model.loss.num_thing_classes
        assert cfg.model.thing_classes == list(range(things))
        assert cfg.model.inference.panoptic_on


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_milestones_increase_and_fall_before_max_steps(path):
    s = load_train_config(path).schedule
    assert s.milestones == sorted(set(s.milestones)) and s.milestones
    assert 0 < s.milestones[0] and s.milestones[-1] < s.max_steps


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.stem)
def test_full_configs_step_16_images_on_their_documented_world_size(path):
    e = load_train_config(path).engine
    assert e.micro_batch_size * e.grad_accumulation * documented_world_size(path) == OFFICIAL_BATCH


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_configs_run_on_one_process_for_40_steps(path):
    cfg = load_train_config(path)
    assert documented_world_size(path) == 1
    assert cfg.schedule.max_steps == 40 and cfg.engine.precision == "fp32"
    assert cfg.data.manifest.startswith("demo_out/shards/")


@pytest.mark.parametrize("name", ["r50_instance", "r50_panoptic"])
def test_r50_coco_configs_are_the_official_50_epoch_lsj_recipe(name):
    cfg = load(name)
    assert (cfg.schedule.max_steps, cfg.schedule.milestones) == COCO_50EP
    assert (cfg.schedule.warmup_steps, cfg.schedule.warmup_factor) == (10, 1.0)
    assert cfg.data.aug == AugConfig(recipe="lsj", image_size=1024)
    assert cfg.engine.precision == "bf16"  # the official COCO configs train under AMP
    assert cfg.init_from == ""


@pytest.mark.parametrize("name", ["r50_semantic", "swinl_semantic"])
def test_ade20k_configs_are_the_official_160k_recipe_in_fp32(name):
    cfg = load(name)
    assert (cfg.schedule.max_steps, cfg.schedule.milestones) == ADE_160K
    assert cfg.data.aug == AugConfig(recipe="ade_semantic")  # 256..1024 / 2048, crop 512, pad 512
    assert cfg.engine.precision == "fp32"  # AMP is off in the official semantic configs
    assert cfg.init_from == ""


@pytest.mark.parametrize("name", ["swinl_instance", "swinl_panoptic"])
def test_swinl_coco_finetunes_are_20_epochs_at_1_2x_from_the_o365_pretrain(name):
    cfg = load(name)
    pretrain = load("swinl_o365_pretrain")
    assert cfg.init_from == f"{pretrain.run_dir}/model"
    steps = round(20 * COCO_TRAIN_IMAGES / OFFICIAL_BATCH)
    assert cfg.schedule.max_steps == steps == 147_859
    official_steps, official_milestones = COCO_50EP
    assert cfg.schedule.milestones == [round(m * steps / official_steps) for m in official_milestones]
    assert cfg.data.aug == AugConfig(recipe="lsj", image_size=round(1.2 * 1024 / 32) * 32)
    assert cfg.engine.precision == "bf16"


def test_swinl_instance_takes_the_official_50_epoch_recipe_from_command_line_overrides():
    """The override line its header documents gives the official ImageNet-start recipe."""
    cfg = load("swinl_instance", "init_from=", "model.backbone.pretrained=weights/swin_large_patch4_window12_384_22k.pth",
               "data.aug.image_size=1024", "engine.micro_batch_size=2", "engine.grad_accumulation=1",
               "schedule.max_steps=368750", "schedule.milestones=[327778,355092]",
               "data.manifest=s3://bucket/shards/coco_instances/train/manifest.json")
    assert cfg.init_from == "" and cfg.model.backbone.pretrained.endswith("_22k.pth")
    assert (cfg.schedule.max_steps, cfg.schedule.milestones) == COCO_50EP
    assert cfg.data.aug == AugConfig(recipe="lsj", image_size=1024)
    assert cfg.engine.micro_batch_size * cfg.engine.grad_accumulation * 8 == OFFICIAL_BATCH
    assert cfg.data.manifest == "s3://bucket/shards/coco_instances/train/manifest.json"


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.stem)
def test_full_configs_start_from_imagenet_weights_or_a_pretrain_bundle(path):
    cfg = load_train_config(path)
    assert bool(cfg.init_from) != bool(cfg.model.backbone.pretrained)


@pytest.mark.parametrize("name", ["r50_o365_pretrain", "swinl_o365_pretrain", "tiny_o365_pretrain"])
def test_o365_pretrains_train_boxes_only_without_mask_enhanced_anchors(name):
    cfg = load(name)
    assert not cfg.model.loss.mask_losses
    assert cfg.model.decoder.initialize_box_type == "no"  # the mask head gets no gradient
    assert cfg.data.aug.recipe == "resize" and cfg.init_from == ""


@pytest.mark.parametrize("name", ["r50_o365_pretrain", "swinl_o365_pretrain"])
def test_o365_pretrains_use_1_2x_coco_sizes_for_12_epochs(name):
    cfg = load(name)
    assert list(cfg.data.aug.short_edges) == list(range(576, 961, 32))  # 1.2 x (480..800), step 32
    assert cfg.data.aug.max_size == 1600  # 1.2 x 1333
    images = 1_740_000  # Objects365 v2 train, approximately
    assert cfg.schedule.max_steps == 12 * images // OFFICIAL_BATCH
    assert cfg.schedule.milestones == [11 * images // OFFICIAL_BATCH]
    assert cfg.engine.precision == "bf16" and cfg.engine.zero_stage == 2
    assert cfg.checkpoint.every_steps == 5000


@pytest.mark.parametrize("arch", ["r50", "swinl", "tiny"])
def test_o365_detection_models_are_the_instance_models_with_365_classes_and_no_mask_losses(arch):
    instance = load_model_config(f"configs/model/{arch}_instance.yaml")
    o365 = load_model_config(f"configs/model/{arch}_o365_detection.yaml")
    assert o365 == replace(instance, num_classes=365,
                           loss=replace(instance.loss, mask_losses=False, num_thing_classes=365),
                           decoder=replace(instance.decoder, initialize_box_type="no"))


def test_tiny_label_sets_match_the_synthetic_demo_data(tmp_path):
    """The tiny configs train on `make demo`'s shards as they are: their class counts must be the data's."""
    make_synthetic(tmp_path, SyntheticSpec(train_images=1, val_images=0, min_size=96, max_size=96,
                                           formats=("coco_instances", "coco_panoptic", "objects365_v2"),
                                           o365_categories=365))

    def categories(rel: str) -> list[dict]:
        # shard manifests list categories sorted by id; the contiguous ids follow that order
        return sorted(json.loads((tmp_path / rel).read_text())["categories"], key=lambda c: c["id"])

    assert load("tiny_instance").model.num_classes == len(categories("coco/annotations/instances_train2017.json"))
    assert load("tiny_o365_pretrain").model.num_classes == len(
        categories("objects365_v2/annotations/zhiyuan_objv2_train.json"))
    panoptic = categories("coco/annotations/panoptic_train2017.json")
    cfg = load("tiny_panoptic").model
    assert cfg.num_classes == len(panoptic)
    assert cfg.thing_classes == [i for i, c in enumerate(panoptic) if c["isthing"]]
    assert cfg.loss.num_thing_classes == len(cfg.thing_classes)


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_config_models_build(path):
    model = build_model(load_train_config(path).model, "cpu", Storage())
    assert sum(p.numel() for p in model.parameters()) > 0


def test_tiny_config_param_groups_are_backbone_and_head_with_and_without_decay():
    cfg = load("tiny_instance")
    groups = param_groups(build_model(cfg.model, "cpu", Storage()), cfg.optim)
    assert [g.name for g in groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert {g.name: g.lr_multiplier for g in groups} == {"backbone": 0.1, "backbone_no_decay": 0.1,
                                                          "head": 1.0, "head_no_decay": 1.0}


@pytest.mark.parametrize(("override", "allowed"), [
    ("engine.precision=fp16", "'fp32', 'bf16'"),
    ("schedule.warmup_method=cosine", "'linear', 'constant'"),
    ("model.msda_backend=triton", "'auto', 'reference', 'cpp', 'cuda'"),
])
def test_choices_are_checked_at_load_naming_the_key_and_the_allowed_values(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        load("tiny_instance", override)
    assert f"key '{key}' in command line override must be one of {allowed}; got str '{value}'" in str(info.value)


@pytest.mark.parametrize(("override", "bound"), [
    ("engine.micro_batch_size=0", ">= 1"), ("engine.grad_accumulation=0", ">= 1"), ("data.shuffle_buffer=0", ">= 1"),
    ("data.prefetch_factor=0", ">= 1"), ("data.num_workers=-1", ">= 0"), ("data.max_shard_retries=-1", ">= 0"),
])
def test_train_refuses_a_bad_batch_or_loader_setting_naming_the_key_the_user_wrote(override, bound, capsys):
    """Through the CLI: exit 2 and one stderr line naming the key (not LoaderConfig's own field names)."""
    assert main(["train", str(TRAIN / "tiny_instance.yaml"), override]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    key = override.split("=")[0]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("error: config error: ")
    assert f"key '{key}' in command line override must be {bound}" in lines[0]
