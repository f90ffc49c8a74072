"""model/backbone.py: shapes, frozen BN, official key map and parameter counts, pretrained loading, and
parity of the Swin backbone with the official D2SwinTransformer (fixture tests/fixtures/parity/swin_small)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from model.backbone import (
    Backbone,
    BackboneConfig,
    build_backbone,
    load_pretrained_backbone,
    official_backbone_key,
    relative_position_index_matches,
)
from model.weights_file import read_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
SWIN_SMALL = FIXTURES / "parity" / "swin_small"
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def _tiny_swin_cfg() -> BackboneConfig:
    """The reduced Swin of the swin_small fixture."""
    return BackboneConfig(name="swin", embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                          window_size=12, pretrain_img_size=384)


def _official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Official `backbone.*` keys (prefix stripped) -> shape, from reference/maskdino_*_keys.txt."""
    keys = {}
    for line in (FIXTURES / "reference" / name).read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        if key.startswith("backbone."):
            keys[key[len("backbone."):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def _check_official_key_map(backbone: Backbone, official: dict[str, tuple[int, ...]], skip: str | None) -> None:
    """Every official key maps to one of ours with the same shape, and every key of ours is reached."""
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    reached = set()
    for name, shape in official.items():
        key = official_backbone_key(name)
        if skip is not None and name.endswith(skip):
            assert key is None, name
            continue
        assert key in ours, f"{name} -> {key}"
        assert ours[key] == shape, f"{name} -> {key}: {shape} vs {ours[key]}"
        reached.add(key)
    assert len(reached) == len(official) - sum(skip is not None and n.endswith(skip) for n in official)
    assert set(ours) == reached, f"ours not mapped: {sorted(set(ours) - reached)[:10]}"


@pytest.fixture(scope="module")
def swin_large() -> Backbone:
    """Full Swin-L backbone (~0.8 GB fp32), built once for this module."""
    return build_backbone(BackboneConfig(name="swin"))


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("hw", [(64, 96), (96, 64)])
@pytest.mark.parametrize("cfg", [BackboneConfig(), _tiny_swin_cfg()], ids=["r50", "swin_tiny"])
def test_output_shapes(cfg: BackboneConfig, hw: tuple[int, int]) -> None:
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *hw))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, feat in out.items():
        stride = backbone.strides[name]
        assert feat.shape == (2, backbone.out_channels[name], hw[0] // stride, hw[1] // stride), name
        assert torch.isfinite(feat).all()


def test_channels_and_strides() -> None:
    assert build_backbone(BackboneConfig()).out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    swin = build_backbone(_tiny_swin_cfg())
    assert swin.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert swin.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(BackboneConfig(name="vgg16"))


# ---------------------------------------------------------------------------------------------- ResNet


def test_frozen_bn_has_no_trainable_params() -> None:
    backbone = build_backbone(BackboneConfig())
    norms = [m for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    assert len(norms) == 53 and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert all(len(list(m.parameters())) == 0 for m in norms)
    assert all(p.requires_grad for p in backbone.parameters())  # FREEZE_AT 0: all convs train
    assert all(n.endswith(".weight") and p.dim() == 4 for n, p in backbone.named_parameters())


def test_frozen_bn_matches_detectron2_formula() -> None:
    bn = FrozenBatchNorm2d(8)
    for buf, lo in (("weight", -1.0), ("bias", -1.0), ("running_mean", -1.0), ("running_var", 0.1)):
        getattr(bn, buf).uniform_(lo, 2.0)
    x = torch.randn(2, 8, 5, 5)
    scale = bn.weight * (bn.running_var + 1e-5).rsqrt()  # detectron2 FrozenBatchNorm2d, eps 1e-5
    ref = x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
    assert bn.eps == 1e-5
    torch.testing.assert_close(bn(x), ref)


def test_freeze_at_and_plain_bn() -> None:
    backbone = build_backbone(BackboneConfig(norm="bn", freeze_at=2))
    body = backbone.body
    assert not body.conv1.weight.requires_grad and isinstance(body.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(isinstance(m, FrozenBatchNorm2d) for m in body.layer1.modules() if "Norm" in type(m).__name__)
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)


def test_param_count_r50_backbone() -> None:
    """torchvision resnet50 without fc and without BN affine (FrozenBN: buffers) = 23,454,912 conv weights."""
    backbone = build_backbone(BackboneConfig())
    assert sum(p.numel() for p in backbone.parameters()) == 23_454_912
    _check_official_key_map(backbone, _official_keys("maskdino_r50_keys.txt"), skip=None)


def test_r50_matches_torchvision_resnet50() -> None:
    """Same function as torchvision resnet50 in eval (= detectron2 R50, STRIDE_IN_1X1 False, FrozenBN), with
    torchvision-format weights and random BN statistics loaded through load_pretrained_backbone."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for buf, lo in (("weight", 0.5), ("bias", -0.2), ("running_mean", -0.2), ("running_var", 0.5)):
                getattr(m, buf).data.uniform_(lo, lo + 0.5)
    backbone = build_backbone(BackboneConfig()).eval()
    assert load_pretrained_backbone(backbone, tv.state_dict()) == []
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, name in enumerate(["res2", "res3", "res4", "res5"], start=1):
            y = getattr(tv, f"layer{i}")(y)
            torch.testing.assert_close(out[name], y, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Swin


def test_param_count_swinl_backbone(swin_large: Backbone) -> None:
    """Official D2SwinTransformer Swin-L incl. norm0..3 = 195,201,204 parameters."""
    assert sum(p.numel() for p in swin_large.parameters()) == 195_201_204


def test_swinl_official_key_map(swin_large: Backbone) -> None:
    """relative_position_index maps to None (non-persistent buffer in timm; compared instead)."""
    official = _official_keys("maskdino_swinl_keys.txt")
    _check_official_key_map(swin_large, official, skip="relative_position_index")
    rpi = official["layers.0.blocks.0.attn.relative_position_index"]
    assert rpi == (144, 144)


def _load_swin_small() -> tuple[Backbone, dict[str, np.ndarray]]:
    weights = np.load(SWIN_SMALL / "weights.npz")
    official = {k[len("backbone."):]: weights[k] for k in weights.files if k.startswith("backbone.")}
    backbone = build_backbone(_tiny_swin_cfg()).eval()
    mapped = {official_backbone_key(k): torch.from_numpy(v) for k, v in official.items()}
    mapped.pop(None)  # the relative_position_index buffers
    backbone.load_state_dict(mapped, strict=True)
    return backbone, official


def _swin_small_input() -> torch.Tensor:
    """[1,3,224,288]: fixture image normalised, then zero-padded right/bottom to /32 (as the meta-arch does)."""
    image = torch.from_numpy(np.load(SWIN_SMALL / "inputs.npz")["image"])
    x = (image - PIXEL_MEAN) / PIXEL_STD
    return F.pad(x, (0, 288 - x.shape[2], 0, 224 - x.shape[1]))[None]


def test_parity_swin_backbone() -> None:
    """Stages 56x72 .. 7x9 with window 12: padding + shifted-window masks (pad-then-roll order) exercised."""
    backbone, official = _load_swin_small()
    for k, v in official.items():
        if k.endswith("relative_position_index"):
            assert relative_position_index_matches(torch.from_numpy(v), backbone), k
    expected = np.load(SWIN_SMALL / "outputs.npz")
    with torch.no_grad():
        out = backbone(_swin_small_input())
    for name, feat in out.items():
        ref = torch.from_numpy(expected[f"backbone_{name}"])
        torch.testing.assert_close(feat, ref, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_timm_roll_then_pad_order_would_break_parity() -> None:
    """Guard: the fixture does exercise the ordering; timm's own roll-then-pad block is off by O(1)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    backbone, _ = _load_swin_small()
    for module in backbone.modules():
        if isinstance(module, SwinTransformerBlock):
            module.__class__ = SwinTransformerBlock
    expected = np.load(SWIN_SMALL / "outputs.npz")
    with torch.no_grad():
        res2 = backbone(_swin_small_input())["res2"]
    assert (res2 - torch.from_numpy(expected["backbone_res2"])).abs().max() > 0.1


def test_swin_drop_path_linear_over_blocks() -> None:
    """Official: torch.linspace(0, drop_path_rate, sum(depths)) over all blocks in order."""
    backbone = build_backbone(_tiny_swin_cfg())
    rates = [getattr(m.drop_path1, "drop_prob", 0.0) for m in backbone.modules() if hasattr(m, "drop_path1")]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 8))


def test_swin_official_format_loads_through_load_pretrained() -> None:
    """Official (Microsoft / D2) Swin names are recognised by load_pretrained_backbone too."""
    reference, official = _load_swin_small()
    backbone = build_backbone(_tiny_swin_cfg())
    extra = {"norm.weight": torch.ones(128), "head.weight": torch.zeros(10, 128)}  # classifier leftovers
    missing = load_pretrained_backbone(backbone, {**official, **extra})
    assert missing == []
    for key, value in reference.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_relative_position_index_mismatch_detected() -> None:
    backbone = build_backbone(_tiny_swin_cfg())
    assert not relative_position_index_matches(torch.zeros(144, 144, dtype=torch.long), backbone)


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("cfg", "timm_name", "timm_kwargs", "expected_missing"),
    [
        (BackboneConfig(), "resnet50", {}, []),
        (_tiny_swin_cfg(), "swin_large_patch4_window12_384",
         {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 12},
         [f"out_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")]),
    ],
    ids=["r50", "swin_tiny"],
)
def test_load_pretrained_timm_round_trip(cfg, timm_name, timm_kwargs, expected_missing) -> None:
    """A timm classification state_dict (head included) loads; the head is dropped, weights land in place."""
    source = timm.create_model(timm_name, pretrained=False, **timm_kwargs).state_dict()
    backbone = build_backbone(cfg)
    missing = load_pretrained_backbone(backbone, source)
    assert sorted(missing) == sorted(expected_missing)
    ours = backbone.state_dict()
    loaded = 0
    for key, value in source.items():
        ours_key = "body." + key.replace("layers.", "layers_", 1) if key.startswith("layers.") else "body." + key
        if ours_key in ours:
            assert torch.equal(ours[ours_key], value), key
            loaded += 1
    assert loaded == len(ours) - len(expected_missing)


def test_load_pretrained_shape_mismatch_names_key_and_shapes() -> None:
    source = timm.create_model("resnet50", pretrained=False).state_dict()
    source["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight.*\(128, 128, 1, 1\).*\(128, 128, 3, 3\)"):
        load_pretrained_backbone(build_backbone(BackboneConfig()), source)


def test_load_pretrained_unknown_key_raises() -> None:
    with pytest.raises(ValueError, match="no counterpart"):
        load_pretrained_backbone(build_backbone(BackboneConfig()), {"blocks.0.weight": torch.zeros(1)})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_read_state_dict(tmp_path: Path, suffix: str) -> None:
    state = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)  # nested under "model", as detectron2/fvcore save
    loaded = read_state_dict(str(path))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
