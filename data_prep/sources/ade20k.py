"""ADE20K SceneParsing (`ADEChallengeData2016`): `images/{training,validation}/*.jpg`,
`annotations/{training,validation}/*.png` (uint8 label maps: 0 = other, 1..150 = classes) and the
class names from `objectInfo150.csv` (which also has the Stuff flag) or `objectInfo150.txt`.

The label PNG is stored byte-identical; values are checked by the shard task (it decodes the PNG)."""
from __future__ import annotations

import csv
import hashlib
import io
import posixpath

import numpy as np

from core import records as R
from core.records import Category, Reject, SampleRecord
from core.storage import Storage, join
from data_prep.shard_config import SourceConfig
from data_prep.sources.coco_json import SourceError
from data_prep.sources.coco_style_build import list_folder
from data_prep.sources.index import SAMPLE_OVERHEAD_BYTES, SourceIndex, combine_fingerprints, listing_digest
from data_prep.sources.layout import SourceLayout, source_layout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NUM_CLASSES = 150


def parse_object_info(text: str, source: str) -> list[Category]:
    """objectInfo150.csv (`Idx,Ratio,Train,Val,Stuff,Name`, synonyms joined by ';') or the
    tab-separated .txt (`Idx Ratio Train Val Name`, no Stuff flag: every class counts as stuff)."""
    is_csv = source.endswith(".csv")
    rows = list(csv.reader(io.StringIO(text), delimiter="," if is_csv else "\t"))
    if not rows or rows[0][0].strip() != "Idx":
        raise SourceError(f"{source} does not start with the 'Idx' header of objectInfo150")
    cats = []
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        try:
            idx = int(row[0])
            name = row[-1].strip().replace(";", ", ") if is_csv else row[-1].strip()
            isthing = is_csv and row[4].strip() == "0"
        except (ValueError, IndexError) as exc:
            raise SourceError(f"{source}: malformed line {row!r}") from exc
        cats.append(Category(id=idx, name=name, isthing=isthing))
    if [c.id for c in cats] != list(range(1, len(cats) + 1)):
        raise SourceError(f"{source}: class indices must run 1..N without gaps")
    return cats


class Ade20kIndex(SourceIndex):
    def __init__(self, *, samples: list[SampleRecord], **fields) -> None:
        super().__init__(keys=[s.key for s in samples], **fields)
        self._samples = samples

    def records(self, start: int, stop: int) -> list[SampleRecord]:
        return self._samples[start:stop]


def categories_uri(cfg: SourceConfig, layout: SourceLayout, storage: Storage) -> str:
    """The class list to read: source.categories as given, else the first objectInfo150 file under root."""
    if cfg.categories:
        return cfg.categories
    for uri in layout.categories:
        if storage.exists(uri):
            return uri
    raise SourceError(f"no objectInfo150.csv or objectInfo150.txt under {cfg.root}; set source.categories")


def build(cfg: SourceConfig, storage: Storage, workdir: str) -> Ade20kIndex:
    layout = source_layout(cfg)
    images_dir, labels_dir = layout.images, layout.labels
    cat_uri = categories_uri(cfg, layout, storage)
    cat_bytes = storage.read_bytes(cat_uri)
    categories = parse_object_info(cat_bytes.decode("utf-8"), cat_uri)
    image_listing = list_folder(storage, images_dir, "image", "source.images")
    label_listing = list_folder(storage, labels_dir, "annotation", "source.labels")
    images = {posixpath.splitext(p)[0]: p for p in image_listing if p.lower().endswith(IMAGE_EXTENSIONS)}
    labels = {posixpath.splitext(p)[0]: p for p in label_listing if p.lower().endswith(".png")}
    rejects: list[Reject] = []
    samples: list[SampleRecord] = []
    sizes: list[int] = []
    for stem in sorted(set(images) | set(labels)):
        key = stem.replace(".", "_")
        if stem not in labels:
            rejects.append(Reject(key, R.MISSING_FILE, f"image '{images[stem]}' has no annotation PNG"))
            continue
        if stem not in images:
            rejects.append(Reject(key, R.MISSING_FILE, f"annotation '{labels[stem]}' has no image"))
            continue
        samples.append(SampleRecord(
            key=key, image_id=posixpath.basename(stem), file_name=images[stem],
            image_uri=join(images_dir, images[stem]), width=None, height=None,
            label_uri=join(labels_dir, labels[stem]),
        ))
        sizes.append(image_listing[images[stem]] + label_listing[labels[stem]] + SAMPLE_OVERHEAD_BYTES)
    order = sorted(range(len(samples)), key=lambda i: samples[i].key)
    return Ade20kIndex(
        samples=[samples[i] for i in order], est_bytes=np.array([sizes[i] for i in order], dtype=np.int64),
        dataset="ade20k", task="semantic", split=cfg.split, categories=categories,
        label_format="ade_label_uint8", driver_rejects=rejects,
        fingerprint=combine_fingerprints(categories=_sha(cat_bytes), images=listing_digest(image_listing),
                                         labels=listing_digest(label_listing)),
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
