"""Streaming, compact parsing of COCO-style annotation files (COCO, Objects365).

The full Objects365 train file has ~25M boxes; `json.load` would need tens of GB. Large files are
streamed one top-level list at a time with ijson (C backend) and appended into typed `array.array`
columns, so the driver holds ~60 bytes per box instead of ~1 KB of Python dicts. Each list is a
separate pass over the local file: ijson's C parser skips the other sections quickly, which measured
faster than feeding one read to several parser coroutines. Small files (COCO val, tests, demos)
take one `json.load` instead: three streaming passes would cost more than the whole shard step.
"""
from __future__ import annotations

import array
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ijson
import numpy as np

from core.records import Category

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A raw dataset that cannot be read at all (not a per-record problem); one-line message."""


@dataclass
class ImageTable:
    """Images of one split, in file order. ids: (I,) int64; widths/heights: (I,) int64."""

    ids: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray


@dataclass
class AnnotationTable:
    """Annotations of one split, in file order; N rows.

    ids, image_ids, category_ids: (N,) int64; bboxes: (N, 4) float64 xywh (NaN where missing);
    iscrowd: (N,) uint8; areas: (N,) float64; segmentations: N raw JSON strings or None
    (None entirely for boxes-only parsing).
    """

    ids: np.ndarray
    image_ids: np.ndarray
    category_ids: np.ndarray
    bboxes: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray
    segmentations: list[str | None] | None

    def __len__(self) -> int:
        return len(self.ids)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# A JSON string, a bare non-finite constant (what Python's json.dump writes for nan/inf), or the
# opening quote of a string that continues past the buffer.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?Infinity|NaN|"')
_LONGEST_CONSTANT = len(b"-Infinity")


class _NonFiniteAsNull:
    """File wrapper that turns bare NaN / Infinity / -Infinity (outside strings) into `null`, which
    the readers below treat as a malformed value (a NaN box -> degenerate_box), not a broken file."""

    def __init__(self, f) -> None:
        self._f, self._carry, self._eof = f, b"", False

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes read(0) for bytes vs str
            return b""
        while not self._eof:
            block = self._f.read(max(size, 1 << 16))
            self._eof = not block
            buf = self._carry + block
            limit = len(buf) if self._eof else len(buf) - _LONGEST_CONSTANT
            out, pos, stop = [], 0, None
            for m in _TOKEN.finditer(buf):
                token = m.group()
                if not self._eof and (token == b'"' or m.end() > limit):
                    stop = m.start()  # incomplete string or constant: wait for more bytes
                    break
                out += [buf[pos:m.start()], b"null" if token[:1] != b'"' else token]
                pos = m.end()
            stop = max(pos, limit) if stop is None else stop
            out.append(buf[pos:stop])
            self._carry = buf[stop:]
            data = b"".join(out)
            if data:
                return data
        data, self._carry = self._carry, b""
        return data


# Files up to this size are parsed with one `json.load` (a single C pass, ~10x the file in memory);
# larger ones are streamed section by section so memory stays ~60 bytes per box.
SMALL_FILE_BYTES = 32 << 20


class AnnotationFile:
    """A COCO-style JSON file whose top-level lists (`images`, `annotations`, `categories`) are
    read one at a time: from one `json.load` for small files, by streaming for large ones."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._doc: Any = None
        if os.path.getsize(path) <= SMALL_FILE_BYTES:
            try:
                with open(path, "rb") as f:
                    self._doc = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SourceError(f"{path} is not valid JSON ({exc}); re-download or fix the file") from exc
            if not isinstance(self._doc, dict):
                raise SourceError(f"{path} is not a JSON object; is this a COCO-style annotation file?")

    def items(self, section: str) -> Iterator[Any]:
        if self._doc is None:
            yield from _stream_items(self.path, f"{section}.item")
            return
        value = self._doc.get(section, [])
        yield from value if isinstance(value, list) else []


def _stream_items(path: str, prefix: str) -> Iterator[Any]:
    yielded = 0
    try:
        with open(path, "rb") as f:
            for item in ijson.items(f, prefix, use_float=True):
                yield item
                yielded += 1
        return
    except ijson.JSONError as exc:
        # yajl rejects NaN/Infinity (what Python's json.dump writes for non-finite floats): read
        # again with them as null, skipping what was yielded; a really broken file fails below.
        log.debug("%s: %s; re-reading with NaN/Infinity as null", path, " ".join(str(exc).split())[:120])
    try:
        with open(path, "rb") as f:
            for i, item in enumerate(ijson.items(_NonFiniteAsNull(f), prefix, use_float=True)):
                if i >= yielded:
                    yield item
    except ijson.JSONError as exc:
        reason = " ".join(str(exc).split())[:160]  # yajl's message spans lines and quotes the text
        raise SourceError(f"{path} is not valid JSON ({reason}); re-download or fix the file") from exc


def parse_categories(source: AnnotationFile, default_isthing: bool = True) -> list[Category]:
    """Categories sorted by id (Objects365 lists them unsorted; ids, never names, are the key)."""
    path = source.path
    cats = []
    seen: set[int] = set()
    for c in source.items("categories"):
        try:
            cid, name = int(c["id"]), str(c["name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: category entry {c!r} lacks an integer 'id' or a 'name'") from exc
        if cid in seen:
            raise SourceError(f"{path}: category id {cid} is listed twice; category ids must be unique")
        seen.add(cid)
        cats.append(Category(id=cid, name=name, isthing=bool(c.get("isthing", default_isthing))))
    if not cats:
        raise SourceError(f"{path} has no 'categories'; is this a COCO-style annotation file?")
    return sorted(cats, key=lambda c: c.id)


def parse_images(source: AnnotationFile) -> ImageTable:
    ids, widths, heights = array.array("q"), array.array("q"), array.array("q")
    names: list[str] = []
    for im in source.items("images"):
        try:
            ids.append(int(im["id"]))
            names.append(str(im["file_name"]))
            widths.append(int(im.get("width") or 0))
            heights.append(int(im.get("height") or 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{source.path}: image entry {im!r} lacks an integer 'id' or a 'file_name'") from exc
    return ImageTable(
        ids=np.frombuffer(ids, dtype=np.int64),
        file_names=names,
        widths=np.frombuffer(widths, dtype=np.int64),
        heights=np.frombuffer(heights, dtype=np.int64),
    )


def as_int(value: Any) -> int:
    """Integer ids; -1 marks a missing or malformed one (rejected downstream as invalid)."""
    if isinstance(value, bool) or value is None:
        return -1
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return -1


def as_bbox(value: Any) -> tuple[float, float, float, float]:
    if isinstance(value, list) and len(value) == 4:
        try:
            return tuple(float(v) for v in value)  # type: ignore[return-value]
        except (TypeError, ValueError):
            pass
    return (math.nan, math.nan, math.nan, math.nan)


def parse_annotations(source: AnnotationFile, with_segmentation: bool) -> AnnotationTable:
    """Columns of the `annotations` list; malformed fields become -1 / NaN and are rejected later."""
    ids, image_ids, category_ids = array.array("q"), array.array("q"), array.array("q")
    bboxes, areas, crowd = array.array("d"), array.array("d"), array.array("B")
    segmentations: list[str | None] | None = [] if with_segmentation else None
    for a in source.items("annotations"):
        ids.append(as_int(a.get("id")))
        image_ids.append(as_int(a.get("image_id")))
        category_ids.append(as_int(a.get("category_id")))
        bboxes.extend(as_bbox(a.get("bbox")))
        area = a.get("area")
        areas.append(float(area) if isinstance(area, (int, float)) else math.nan)
        crowd.append(1 if a.get("iscrowd") else 0)
        if segmentations is not None:
            seg = a.get("segmentation")
            segmentations.append(None if seg is None else json.dumps(seg, separators=(",", ":")))
    return AnnotationTable(
        ids=np.frombuffer(ids, dtype=np.int64),
        image_ids=np.frombuffer(image_ids, dtype=np.int64),
        category_ids=np.frombuffer(category_ids, dtype=np.int64),
        bboxes=np.frombuffer(bboxes, dtype=np.float64).reshape(-1, 4),
        iscrowd=np.frombuffer(crowd, dtype=np.uint8),
        areas=np.frombuffer(areas, dtype=np.float64),
        segmentations=segmentations,
    )
