"""Stage weight transfer (docs/pipeline.md#stage-transfer): start a stage's model from the previous stage's weights.

A fine-tune (e.g. COCO instance, 80 classes, masks on) starts from a pretrain (e.g. Objects365 detection,
365 classes, `loss.mask_losses=false`). Every tensor is loaded from the source except those whose MEANING
depends on the label set: when the label sets differ those keep the fresh target model's initial values
(exactly what a new model of the target config starts with). The report says what was loaded,
re-initialised, missing in the source and dropped; the trainer saves it in the run folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from core.records import Category
from core.storage import Storage, join
from pipeline.bundle_files import CATEGORIES_NAME, WEIGHTS_NAME
from pipeline.model_bundle import read_categories
from pipeline.model_tools import read_weights

log = logging.getLogger(__name__)

# Parameter/buffer names (a module prefix, matched as `name == p` or `name.startswith(p + ".")`) whose rows
# are indexed by the contiguous class id, so their values mean "this class" and are wrong for another label
# set even when the shapes happen to agree:
# - predictor.class_embed: the class head, [K(+1 with semantic_ce_loss), d] weight and [K(+1)] bias. It is
#   the only class projection: the two-stage encoder's proposal scores (`_two_stage_queries`) reuse this same
#   module, so there is no separate encoder class head to remap.
# - predictor.label_enc: the DN label embedding, nn.Embedding(K, d); row k embeds the (noised) GT class k.
# - criterion.empty_weight: the per-class CE weight [K + 1] (last entry = no-object weight), a persistent
#   buffer that is saved with the weights.
# Nothing else in the model is sized by or indexed by num_classes (backbone, pixel decoder, decoder layers,
# box and mask heads are class-agnostic).
LABEL_DEPENDENT_PREFIXES: tuple[str, ...] = (
    "predictor.class_embed",
    "predictor.label_enc",
    "criterion.empty_weight",
)


class TransferError(ValueError):
    """The source weights cannot start the target model (configs differ beyond the label set)."""


@dataclass(frozen=True)
class TransferReport:
    """What `transfer_weights` did, tensor name by tensor name (each list sorted).

    loaded: copied from the source. reinitialised: label-dependent tensors left at the target's fresh
    initial values because the label sets differ (or could not be shown identical). missing_in_source: in
    the target model but not in the source (fresh init). dropped: in the source but not in the target.
    labels: why the label-dependent tensors were or were not re-initialised."""

    loaded: list[str]
    reinitialised: list[str]
    missing_in_source: list[str]
    dropped: list[str]
    source: str
    labels: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: Mapping) -> TransferReport:
        return cls(**{k: payload[k] for k in ("loaded", "reinitialised", "missing_in_source", "dropped", "source")},
                   labels=payload.get("labels", ""))

    def lines(self) -> list[str]:
        """Human summary: the counts, then the re-initialised / missing / dropped names."""
        counts = (f"weight transfer from {self.source or '<state dict>'}: {len(self.loaded)} loaded, "
                  f"{len(self.reinitialised)} re-initialised, {len(self.missing_in_source)} initialised fresh "
                  f"(missing in source), {len(self.dropped)} dropped (not in target)")
        out = [counts]
        if self.labels:
            out.append(f"label set: {self.labels}")
        out += [f"re-initialised: {name}" for name in self.reinitialised]
        out += [f"initialised fresh (missing in source): {name}" for name in self.missing_in_source]
        out += [f"dropped: {name}" for name in self.dropped]
        return out


def label_dependent(name: str) -> bool:
    """True when the tensor `name` (a state-dict key) means something per class (LABEL_DEPENDENT_PREFIXES)."""
    return any(name == p or name.startswith(p + ".") for p in LABEL_DEPENDENT_PREFIXES)


def _label_key(categories: Sequence[Category]) -> list[tuple[int, str]]:
    # Order matters (it defines the contiguous ids, i.e. which row is which class); isthing does not change
    # what a class row means, so it is not compared.
    return [(int(c.id), str(c.name)) for c in categories]


def _same_labels(source: Sequence[Category] | None, target: Sequence[Category] | None) -> tuple[bool, str]:
    """(keep the label-dependent tensors?, the reason, for the report)."""
    if source is None or target is None:
        return False, "unknown (categories missing for the source or the target): class tensors re-initialised"
    if _label_key(source) == _label_key(target):
        return True, f"identical ({len(target)} categories): class tensors loaded"
    return False, f"differs ({len(source)} -> {len(target)} categories): class tensors re-initialised"


def _check_category_count(state: Mapping[str, Tensor], categories: Sequence[Category] | None, side: str) -> None:
    """A categories list that does not match the weights it comes with would silently mislabel classes."""
    rows = state.get("predictor.label_enc.weight")
    if categories is not None and rows is not None and len(categories) != rows.shape[0]:
        raise TransferError(f"{side} lists {len(categories)} categories but its predictor.label_enc.weight has "
                            f"{rows.shape[0]} rows (num_classes)")


def _check_shapes(keys: Sequence[str], source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
    bad = [k for k in keys if tuple(source[k].shape) != tuple(target[k].shape)]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        k = bad[0]
        raise TransferError(f"shape mismatch for {k}: source {tuple(source[k].shape)} vs target "
                            f"{tuple(target[k].shape)}{more}; the configs differ beyond the label set")


def transfer_weights(model: torch.nn.Module, source_state: Mapping[str, Tensor],
                     source_categories: Sequence[Category] | None, target_categories: Sequence[Category] | None,
                     source: str = "") -> TransferReport:
    """Load `source_state` into `model` (a freshly built target model) in place, except label-dependent
    tensors when the label sets differ: those keep the model's own initial values.

    Label sets are equal when both category lists are given and list the same (id, name) in the same order;
    otherwise every label-dependent tensor is re-initialised, whatever its shape. Raises TransferError on a
    shape mismatch of any other tensor, or when a category list does not match its weights' num_classes."""
    target_state = model.state_dict()
    _check_category_count(source_state, source_categories, f"source {source}".rstrip())
    _check_category_count(target_state, target_categories, "target")
    keep_labels, labels_note = _same_labels(source_categories, target_categories)
    common = sorted(set(target_state) & set(source_state))
    reinitialised = [k for k in common if label_dependent(k) and not keep_labels]
    loaded = [k for k in common if k not in set(reinitialised)]
    _check_shapes(loaded, source_state, target_state)
    with torch.no_grad():
        # state_dict() tensors share storage with the parameters/buffers: copy_ writes the model in place
        # and casts to the target dtype/device (a bf16 or GPU source loads into an fp32 CPU model).
        for k in loaded:
            target_state[k].copy_(source_state[k])
    report = TransferReport(
        loaded=loaded,
        reinitialised=reinitialised,
        missing_in_source=sorted(set(target_state) - set(source_state)),
        dropped=sorted(set(source_state) - set(target_state)),
        source=source,
        labels=labels_note,
    )
    for line in report.lines()[:2]:
        log.info(line)
    return report


def transfer_from_bundle(model: torch.nn.Module, storage: Storage, bundle_uri: str,
                         target_categories: Sequence[Category] | None) -> TransferReport:
    """`transfer_weights` from a bundle folder (its model.safetensors and categories.json, if any)."""
    weights_uri = join(bundle_uri, WEIGHTS_NAME)
    if not storage.exists(weights_uri):
        raise TransferError(f"{bundle_uri}: no {WEIGHTS_NAME} in it, so there is nothing to transfer")
    categories_uri = join(bundle_uri, CATEGORIES_NAME)
    source_categories = read_categories(storage, categories_uri) if storage.exists(categories_uri) else None
    return transfer_weights(model, read_weights(weights_uri, storage), source_categories, target_categories,
                            source=bundle_uri)


def save_transfer_report(storage: Storage, uri: str, report: TransferReport) -> None:
    """Write the report as JSON (atomic via Storage; local path or s3://)."""
    storage.write_bytes(uri, json.dumps(report.to_json(), indent=1).encode())


def read_transfer_report(storage: Storage, uri: str) -> TransferReport:
    return TransferReport.from_json(json.loads(storage.read_bytes(uri)))
