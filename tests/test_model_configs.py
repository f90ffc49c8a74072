"""Model configs (configs/model/*.yaml), parameter counts against the official ones, `maskdino model-info`,
and the official-checkpoint adapter / `maskdino convert-checkpoint`."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core.storage import Storage
from model.maskdino import MaskDINO
from model.official_checkpoint import convert_official_state_dict, load_official_weights
from model.weights_file import CheckpointError, read_state_dict
from cli import main
from pipeline.model_tools import load_model_config, model_info
from tests.parity_fixtures import build_fixture_model, load_fixture, model_config

CONFIGS = sorted(Path("configs/model").glob("*.yaml"))
REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Official checkpoint key -> shape, from the dumped key lists."""
    keys = {}
    for line in (REFERENCE / f"maskdino_{name}_keys.txt").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        keys[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return keys


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_model_config_loads_and_builds(path):
    info = model_info(load_model_config(str(path)))
    assert info.total_params > 0


def test_param_count_r50_instance():
    info = model_info(load_model_config("configs/model/r50_instance.yaml"))
    assert info.total_params == 52_058_004
    assert info.encoder_levels == ["1/8", "1/16", "1/32", "1/64"]
    assert info.decoder_levels == ["1/64", "1/32", "1/16", "1/8"]


def test_param_count_swinl_instance():
    info = model_info(load_model_config("configs/model/swinl_instance.yaml"))
    assert info.total_params == 222_799_144
    assert info.params_by_module["backbone"] == 195_201_204
    assert info.encoder_levels == ["1/4", "1/8", "1/16", "1/32", "1/64"]


@pytest.mark.parametrize("name,config", [("r50", "r50_instance"), ("swinl", "swinl_instance")])
def test_official_key_list_maps_onto_our_model_exactly(name, config):
    """Every official key (720 R50 / 816 Swin-L) is an alias, a recomputed buffer or maps to one of our keys
    with the same shape, and every key of ours is covered."""
    shapes = official_keys(name)
    fake = {k: torch.zeros(1).expand(s) for k, s in shapes.items()}  # no memory: shapes are what matter
    conv = convert_official_state_dict(fake)
    with torch.device("meta"):
        ours = MaskDINO(load_model_config(f"configs/model/{config}.yaml")).state_dict()
    assert not conv.unmatched
    assert set(conv.state_dict) == set(ours)
    for key, value in conv.state_dict.items():
        assert tuple(value.shape) == tuple(ours[key].shape), key
    assert conv.aliases_resolved == 18 * 6 + 2  # 18 extra copies of the 6 box-head tensors, 2 of the norm


def test_model_info_cli_prints_counts_levels_and_queries(capsys):
    assert main(["model-info", "configs/model/r50_instance.yaml"]) == 0
    out = capsys.readouterr().out
    assert "52,058,004" in out and "backbone" in out and "1/8, 1/16, 1/32, 1/64" in out and "300 matching" in out


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory) -> Path:
    """The instance_small fixture weights saved as the authors' trainer would: {"model": ..., "iteration": ...}."""
    fx = load_fixture("instance_small")
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    torch.save({"model": fx.weights, "iteration": 368750}, path)
    return path


def test_convert_checkpoint_cli_round_trip_gives_the_same_outputs(official_pth, tmp_path, capsys):
    out = tmp_path / "converted.safetensors"
    assert main(["convert-checkpoint", str(official_pth), str(out)]) == 0
    assert "38 aliased copies resolved" in capsys.readouterr().out
    from safetensors.torch import load_file

    fx = load_fixture("instance_small")
    reference = build_fixture_model(fx)
    converted = MaskDINO(model_config(fx), backbone=reference.backbone).eval()
    converted.load_state_dict(load_file(str(out)), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


def test_bare_state_dict_and_module_prefix_are_accepted(tmp_path):
    fx = load_fixture("instance_small")
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in fx.weights.items()}, path)
    model = MaskDINO(model_config(fx), backbone=build_fixture_model(fx).backbone)
    report = load_official_weights(model, path)
    assert not report.missing and not report.unmatched


def test_shape_mismatch_names_the_key_and_both_shapes(official_pth):
    fx = load_fixture("instance_small")
    cfg = model_config(fx)
    cfg.num_classes = 12
    model = MaskDINO(cfg, backbone=build_fixture_model(fx).backbone)
    with pytest.raises(CheckpointError, match=r"class_embed.weight: checkpoint \(10, 256\) vs model \(12, 256\)"):
        load_official_weights(model, official_pth)


def test_differing_alias_copies_are_refused():
    fx = load_fixture("instance_small")
    weights = dict(fx.weights)
    key = "sem_seg_head.predictor.decoder.bbox_embed.1.layers.0.weight"
    weights[key] = weights[key] + 1
    with pytest.raises(CheckpointError, match="bbox_embed.1.layers.0.weight should be a copy"):
        convert_official_state_dict(weights)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="not a weights-only torch checkpoint"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match=r"\.pkl checkpoints need an unrestricted unpickle"):
        read_state_dict(tmp_path / "R-50.pkl")


def test_convert_checkpoint_cli_reports_a_wrong_config_in_one_line(official_pth, tmp_path, capsys):
    code = main(["convert-checkpoint", str(official_pth), str(tmp_path / "x.safetensors"),
                 "--config", "configs/model/tiny_instance.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: shape mismatch for ") and err.count("\n") == 1


def _timm_resnet50_state() -> dict[str, torch.Tensor]:
    """A timm-format ImageNet-style state dict (random values) for the R50 backbone."""
    import timm

    torch.manual_seed(3)
    return {k: v.clone() for k, v in timm.create_model("resnet50", pretrained=False).state_dict().items()}


def _check_backbone_loaded(model, state) -> None:
    ours = model.backbone.state_dict()
    assert torch.equal(ours["body.conv1.weight"], state["conv1.weight"])
    assert torch.equal(ours["body.layer4.2.bn3.running_var"], state["layer4.2.bn3.running_var"])


def test_imagenet_weights_load_from_a_local_path(tmp_path):
    from safetensors.torch import save_file

    from pipeline.model_tools import build_model

    state = _timm_resnet50_state()
    save_file(state, tmp_path / "r50.safetensors")
    cfg = load_model_config("configs/model/r50_instance.yaml", [f"backbone.pretrained={tmp_path}/r50.safetensors"])
    _check_backbone_loaded(build_model(cfg, "cpu", Storage()), state)


@pytest.mark.s3
def test_imagenet_weights_load_from_s3(s3_bucket, tmp_path):
    from pipeline.model_tools import build_model

    storage, bucket = s3_bucket
    state = _timm_resnet50_state()
    torch.save(state, tmp_path / "r50.pth")
    storage.write_bytes(f"{bucket}/weights/r50.pth", (tmp_path / "r50.pth").read_bytes())
    cfg = load_model_config("configs/model/r50_instance.yaml", [f"backbone.pretrained={bucket}/weights/r50.pth"])
    _check_backbone_loaded(build_model(cfg, "cpu", storage), state)
