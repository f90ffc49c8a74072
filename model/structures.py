"""Typed containers at the model's boundaries: training targets, head outputs and post-processed results.

Conventions (as the official code): boxes inside the model are (cx, cy, w, h) normalised to the padded
image tensor; masks are logits at 1/4 of the padded size; results are in original-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Targets:
    """Ground truth of one image.

    labels [n] int64 contiguous class ids; boxes [n, 4] normalised cxcywh; masks [n, H, W] bool/float at the
    padded input size, or None in detection-only mode (Objects365 pretraining).
    """

    labels: Tensor
    boxes: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Predictions:
    """One prediction set. logits [B, Q, K]; boxes [B, Q, 4] normalised cxcywh (padded image);
    masks [B, Q, H/4, W/4] logits, or None where the official code skips them (eval aux layers)."""

    logits: Tensor
    boxes: Tensor
    masks: Tensor | None = None


@dataclass
class DenoisingGroups:
    """How the denoising (DN) queries were laid out for one training forward.

    num_groups (`scalar` in the official code) groups of `single_pad` queries each; query
    `group * single_pad + j` of image b reconstructs ground truth j of image b.
    """

    num_groups: int
    single_pad: int
    attn_mask: Tensor  # [pad_size + Q, pad_size + Q] bool, True = blocked

    @property
    def pad_size(self) -> int:
        return self.num_groups * self.single_pad


@dataclass
class DenoisingOutput:
    """Predictions of the DN queries: `final` from the last layer, `aux` for the earlier sets (same order
    as HeadOutput.aux)."""

    groups: DenoisingGroups
    final: Predictions
    aux: list[Predictions] = field(default_factory=list)


@dataclass
class HeadOutput:
    """Everything the decoder predicts for a batch.

    final = last decoder layer; aux = the initial prediction (INITIAL_PRED) then decoder layers 1..L-1;
    interm = the two-stage encoder proposals (top-k); dn = denoising queries (training only).
    """

    final: Predictions
    aux: list[Predictions]
    interm: Predictions | None = None
    dn: DenoisingOutput | None = None


@dataclass
class EncoderOutput:
    """Pixel decoder outputs. mask_features [B, mask_dim, H/4, W/4]; multi_scale [levels] of [B, C, h, w]
    in encoder order (see docs/model.md#level-order)."""

    mask_features: Tensor
    multi_scale: list[Tensor]


@dataclass
class InstanceResult:
    """Instance predictions of one image in original-image pixels.

    scores [N]; classes [N] contiguous ids; boxes [N, 4] xyxy (not clipped, as the official code);
    masks [N, H, W] bool; query_index [N] decoder query of each instance.
    """

    scores: Tensor
    classes: Tensor
    boxes: Tensor
    masks: Tensor
    query_index: Tensor


@dataclass
class PanopticSegment:
    id: int
    category_id: int
    isthing: bool


@dataclass
class PanopticResult:
    """segment_map [H, W] int32 (0 = void) and one entry per segment id."""

    segment_map: Tensor
    segments: list[PanopticSegment]


@dataclass
class SemanticResult:
    """probabilities [C, H, W] per-class scores at original size; `labels` is their per-pixel argmax."""

    probabilities: Tensor

    @property
    def labels(self) -> Tensor:
        return self.probabilities.argmax(0)


@dataclass
class ImageResult:
    """What inference returns for one image; each task present when enabled in the config."""

    instances: InstanceResult | None = None
    panoptic: PanopticResult | None = None
    semantic: SemanticResult | None = None
