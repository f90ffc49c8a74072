"""Per-sample checks done inside shard tasks (they need the bytes): image decodability and
truncation, image size against the JSON, segmentation -> compressed RLE, panoptic and semantic
label maps against their JSON. Each problem raises `SampleProblem(reason, detail)`, which the task
turns into a `Reject`; nothing here decides what to do with a sample."""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from core import records as R

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Member extension per image format; PNG images must not collide with the `<key>.png` label member.
_IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "image.png"}


class SampleProblem(Exception):
    """A record-level data problem: becomes a line in rejects.jsonl, never a traceback."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    extension: str  # tar member extension holding the original bytes


def _decode_fully(data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).load()
    except OSError as exc:
        reason = R.TRUNCATED_IMAGE if "truncated" in str(exc) else R.UNDECODABLE_IMAGE
        raise SampleProblem(reason, f"decoding failed: {exc}") from exc
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleProblem(R.UNDECODABLE_IMAGE, f"decoding failed: {exc}") from exc


def _ends_cleanly(fmt: str, data: bytes) -> bool:
    if fmt == "JPEG":
        return data.rstrip(b"\x00").endswith(_JPEG_EOI)
    if fmt == "PNG":
        return data.endswith(_PNG_IEND)
    return False


# Start-of-frame markers that carry the image size (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fast_header(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read straight from a JPEG SOF segment or the PNG IHDR chunk, or None
    to let PIL decide. PIL's open parses every table of the header: ~35 us an image, a fifth of a
    shard task's CPU for Objects365-sized JPEGs; this walk costs a few us."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return ("PNG", width, height) if width and height else None
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan before any frame header: let PIL judge
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF:
            if pos + 9 > end:
                return None
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            return ("JPEG", width, height) if width and height else None
        if length < 2:
            return None
        pos += 2 + length
    return None


def _pil_header(data: bytes) -> tuple[str, int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            return img.format or "", img.size[0], img.size[1]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleProblem(R.UNDECODABLE_IMAGE, f"not a readable image ({exc})") from exc


def inspect_image(data: bytes, decode: str = "header") -> ImageInfo:
    """Format and size from the header; `decode="header"` also requires the end-of-image marker
    (JPEG EOI / PNG IEND) and fully decodes only files that lack it, to tell a truncated file from
    one with trailing bytes; `decode="full"` decodes every image."""
    if not data:
        raise SampleProblem(R.TRUNCATED_IMAGE, "image file is empty")
    fmt, width, height = _fast_header(data) or _pil_header(data)
    if decode == "full" or not _ends_cleanly(fmt, data):
        _decode_fully(data)
    return ImageInfo(format=fmt, width=width, height=height,
                     extension=_IMAGE_EXTENSIONS.get(fmt, fmt.lower() or "img"))


def check_image_size(info: ImageInfo, width: int | None, height: int | None) -> None:
    if width is not None and (info.width, info.height) != (width, height):
        raise SampleProblem(R.SIZE_MISMATCH,
                            f"image is {info.width}x{info.height} but the JSON says {width}x{height}")


def to_compressed_rle(segmentation_json: str, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed RLE, compressed RLE) as compressed RLE with a
    str `counts`. Compressed RLE passes through unchanged. Polygon parts with fewer than 3 points
    are dropped (pycocotools would read a 4-number part as a box)."""
    seg = json.loads(segmentation_json)
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            raise SampleProblem(R.INVALID_SEGMENTATION, "polygon has no part with 3 or more points")
        _check_polygon(parts, height, width)
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_number(v) for v in size)):
            raise SampleProblem(R.INVALID_SEGMENTATION, f"RLE size {size!r} is not [height, width]")
        if list(seg["size"]) != [height, width]:
            raise SampleProblem(R.INVALID_SEGMENTATION,
                                f"RLE size {list(seg['size'])} differs from the image's [{height}, {width}]")
        if isinstance(seg["counts"], str):
            return {"size": [height, width], "counts": seg["counts"]}
        counts = seg["counts"]
        if not (isinstance(counts, list) and all(_is_number(c) and c >= 0 and float(c).is_integer()
                                                 for c in counts)):
            raise SampleProblem(R.INVALID_SEGMENTATION,
                                "uncompressed RLE counts are not a list of non-negative integers")
        if sum(seg["counts"]) != height * width:
            raise SampleProblem(R.INVALID_SEGMENTATION,
                                f"uncompressed RLE covers {sum(seg['counts'])} pixels, not {height * width}")
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        raise SampleProblem(R.INVALID_SEGMENTATION, "segmentation is neither polygons nor RLE")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_polygon(parts: list[list], height: int, width: int) -> None:
    """Finite numbers, at most one image size outside the image: pycocotools rasterises every edge
    point by point, so a NaN or huge coordinate would allocate gigabytes (or crash) in C."""
    for part in parts:
        if not all(_is_number(v) for v in part):
            raise SampleProblem(R.INVALID_SEGMENTATION, "polygon has a coordinate that is not a finite number")
        xs, ys = np.asarray(part[0::2], dtype=np.float64), np.asarray(part[1::2], dtype=np.float64)
        if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
            raise SampleProblem(R.INVALID_SEGMENTATION,
                                f"polygon reaches ({xs.max():g}, {ys.max():g}) / ({xs.min():g}, {ys.min():g}), "
                                f"far outside the {width}x{height} image")


def _decode_label(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleProblem(R.UNDECODABLE_LABEL, f"{what} PNG cannot be decoded ({exc})") from exc


def check_panoptic_png(data: bytes, width: int, height: int, segment_ids: list[int]) -> None:
    """The PNG (rgb2id, 0 = void) and segments_info must name the same segments."""
    img = _decode_label(data, "panoptic")
    if img.size != (width, height):
        raise SampleProblem(R.SIZE_MISMATCH, f"panoptic PNG is {img.size[0]}x{img.size[1]}, image is {width}x{height}")
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint32)
    ids = set(np.unique(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]).tolist()) - {0}
    listed = set(segment_ids)
    if ids - listed:
        raise SampleProblem(R.PNG_ID_WITHOUT_SEGMENT,
                            f"PNG segment ids {sorted(ids - listed)[:5]} have no segments_info entry")
    if listed - ids:
        raise SampleProblem(R.SEGMENT_WITHOUT_PIXELS,
                            f"segments_info ids {sorted(listed - ids)[:5]} have no pixels in the PNG")


def check_semantic_png(data: bytes, width: int, height: int, num_classes: int) -> None:
    """ADE20K label map: one channel, image size, values 0 (other) .. num_classes."""
    img = _decode_label(data, "label")
    if img.mode not in ("L", "P"):
        raise SampleProblem(R.UNDECODABLE_LABEL, f"label PNG has mode {img.mode}, expected single-channel L")
    if img.size != (width, height):
        raise SampleProblem(R.SIZE_MISMATCH, f"label PNG is {img.size[0]}x{img.size[1]}, image is {width}x{height}")
    top = int(np.asarray(img).max()) if width and height else 0
    if top > num_classes:
        raise SampleProblem(R.UNKNOWN_CATEGORY, f"label value {top} is above the {num_classes} classes")
