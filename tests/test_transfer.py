"""Stage weight transfer (pipeline/transfer.py): which tensors are loaded, which are re-initialised and
why, errors for incompatible configs, and the bundle + JSON report round trip. Tiny config, CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from core.records import Category
from core.storage import Storage
from pipeline.model_bundle import save_bundle
from pipeline.model_tools import build_model, load_model_config
from pipeline.transfer import (
    LABEL_DEPENDENT_PREFIXES,
    TransferError,
    TransferReport,
    label_dependent,
    read_transfer_report,
    save_transfer_report,
    transfer_from_bundle,
    transfer_weights,
)

TINY = "configs/model/tiny_instance.yaml"
PRETRAIN = ["num_classes=365", "loss.mask_losses=false"]
FINETUNE = ["num_classes=80"]
LABEL_TENSORS = ["criterion.empty_weight", "predictor.class_embed.bias", "predictor.class_embed.weight",
                 "predictor.label_enc.weight"]
O365 = [Category(i + 1, f"o365 class {i}", True) for i in range(365)]
COCO = [Category(i + 1, f"coco class {i}", True) for i in range(80)]


def _model(overrides: list[str], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(load_model_config(TINY, overrides), "cpu", Storage())


def _trained_state(overrides: list[str]) -> dict[str, Tensor]:
    """A source state that differs from any fresh init everywhere (constant-initialised norms and biases
    included), as a trained checkpoint would."""
    gen = torch.Generator().manual_seed(7)
    return {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in _model(overrides, seed=0).state_dict().items()}


def _fresh_state(overrides: list[str], seed: int) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in _model(overrides, seed).state_dict().items()}


def _assert_loaded_from(model: torch.nn.Module, source: dict[str, Tensor], names: list[str]) -> None:
    state = model.state_dict()
    for k in names:
        assert torch.equal(state[k], source[k]), k


def test_label_dependent_prefixes_match_whole_module_names_only():
    assert LABEL_DEPENDENT_PREFIXES == ("predictor.class_embed", "predictor.label_enc", "criterion.empty_weight")
    assert all(label_dependent(k) for k in LABEL_TENSORS)
    assert not label_dependent("predictor.class_embed_extra.weight")
    assert not label_dependent("predictor.box_head.layers.0.weight")
    assert not label_dependent("predictor.enc_output.weight")  # two-stage encoder: class-agnostic


def test_pretrain_to_finetune_reinitialises_exactly_the_label_dependent_tensors():
    source = _trained_state(PRETRAIN)
    model = _model(FINETUNE, seed=1)
    fresh = _fresh_state(FINETUNE, seed=1)  # what a new fine-tune model initialises (same seed)

    report = transfer_weights(model, source, O365, COCO, source="o365-pretrain")

    assert report.reinitialised == LABEL_TENSORS
    assert report.missing_in_source == [] and report.dropped == []
    assert sorted(report.loaded + report.reinitialised) == sorted(fresh)
    _assert_loaded_from(model, source, report.loaded)
    state = model.state_dict()
    for k in LABEL_TENSORS:
        assert torch.equal(state[k], fresh[k]), k
    assert state["predictor.class_embed.weight"].shape == (80, 256)
    assert state["predictor.class_embed.bias"].shape == (80,)
    assert state["predictor.label_enc.weight"].shape == (80, 256)
    assert state["criterion.empty_weight"].shape == (81,)
    assert "365 -> 80 categories" in report.labels
    assert report.lines()[0] == (f"weight transfer from o365-pretrain: {len(fresh) - 4} loaded, 4 re-initialised, "
                                 "0 initialised fresh (missing in source), 0 dropped (not in target)")
    assert [line for line in report.lines() if line.startswith("re-initialised: ")] == \
        [f"re-initialised: {k}" for k in LABEL_TENSORS]


def test_identical_categories_reinitialise_nothing():
    source = _trained_state(FINETUNE)
    model = _model(FINETUNE, seed=1)

    report = transfer_weights(model, source, COCO, [Category(c.id, c.name, c.isthing) for c in COCO])

    assert report.reinitialised == [] and report.missing_in_source == [] and report.dropped == []
    assert report.loaded == sorted(source)
    _assert_loaded_from(model, source, list(source))


def test_same_size_different_categories_reinitialise_class_tensors():
    other = [Category(c.id, f"objects365 {c.name}", c.isthing) for c in O365]
    reordered = O365[1:] + O365[:1]  # same classes, other contiguous ids: rows mean other classes
    for target_categories in (other, reordered):
        source = _trained_state(PRETRAIN)
        model = _model(PRETRAIN, seed=1)
        fresh = _fresh_state(PRETRAIN, seed=1)

        report = transfer_weights(model, source, O365, target_categories)

        assert report.reinitialised == LABEL_TENSORS
        state = model.state_dict()
        for k in LABEL_TENSORS:
            assert torch.equal(state[k], fresh[k]) and not torch.equal(state[k], source[k]), k
        _assert_loaded_from(model, source, report.loaded)


def test_unknown_categories_reinitialise_class_tensors():
    source = _trained_state(FINETUNE)
    report = transfer_weights(_model(FINETUNE, seed=1), source, None, COCO)
    assert report.reinitialised == LABEL_TENSORS
    assert report.labels.startswith("unknown")


def test_incompatible_non_label_shape_raises_naming_key_and_shapes():
    source = _trained_state(PRETRAIN)
    model = _model(FINETUNE + ["decoder.dim_feedforward=64"], seed=1)
    before = _fresh_state(FINETUNE + ["decoder.dim_feedforward=64"], seed=1)

    with pytest.raises(TransferError) as err:
        transfer_weights(model, source, O365, COCO)

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("shape mismatch for predictor.decoder.layers.0.linear1.bias: source (128,) vs "
                              "target (64,)")
    # Checked before anything is copied: the model is left as built.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_category_list_not_matching_the_weights_raises():
    with pytest.raises(TransferError, match="source lists 80 categories but its predictor.label_enc.weight has 365"):
        transfer_weights(_model(FINETUNE, seed=1), _trained_state(PRETRAIN), COCO, COCO)


def test_extra_source_tensors_are_dropped_and_absent_ones_initialised_fresh():
    # learn_tgt adds predictor.query_feat (learned content queries) that the target model does not have.
    source = _trained_state(FINETUNE + ["decoder.learn_tgt=true"])
    del source["predictor.box_head.layers.2.bias"]
    model = _model(FINETUNE, seed=1)
    fresh = _fresh_state(FINETUNE, seed=1)

    report = transfer_weights(model, source, COCO, COCO)

    assert report.dropped == ["predictor.query_feat.weight"]
    assert report.missing_in_source == ["predictor.box_head.layers.2.bias"]
    assert report.reinitialised == []
    assert torch.equal(model.state_dict()["predictor.box_head.layers.2.bias"], fresh["predictor.box_head.layers.2.bias"])
    assert "initialised fresh (missing in source): predictor.box_head.layers.2.bias" in report.lines()
    assert "dropped: predictor.query_feat.weight" in report.lines()


def test_bundle_round_trip_and_report_saved_as_json(tmp_path):
    storage = Storage()
    bundle = str(tmp_path / "pretrain")
    source = _trained_state(PRETRAIN)
    save_bundle(storage, bundle, load_model_config(TINY, PRETRAIN), source, O365)
    model = _model(FINETUNE, seed=1)

    report = transfer_from_bundle(model, storage, bundle, COCO)

    assert report.source == bundle
    assert report.reinitialised == LABEL_TENSORS
    _assert_loaded_from(model, source, report.loaded)
    out = str(tmp_path / "run" / "transfer.json")
    save_transfer_report(storage, out, report)
    payload = json.loads((tmp_path / "run" / "transfer.json").read_text())
    assert payload["reinitialised"] == LABEL_TENSORS and payload["source"] == bundle
    assert read_transfer_report(storage, out) == report
    assert isinstance(report, TransferReport)
