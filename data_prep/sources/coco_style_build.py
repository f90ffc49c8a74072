"""Shared build step for COCO-style sources: fetch the JSON once, parse it compactly, validate."""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from core.storage import Storage, is_s3, join
from data_prep.sources.coco_json import (
    AnnotationFile,
    SourceError,
    file_sha256,
    parse_annotations,
    parse_categories,
    parse_images,
)
from data_prep.sources.coco_style import CocoStyleIndex, select_annotations, select_images
from data_prep.sources.index import combine_fingerprints, list_relative, listing_digest


def local_copy(storage: Storage, uri: str, workdir: str) -> str:
    """A local path for a (possibly s3://) annotation file; ijson makes several passes over it."""
    if not storage.exists(uri):
        raise SourceError(f"annotation file {uri} not found; set source.annotation or check source.root")
    if not is_s3(uri):
        return uri
    os.makedirs(workdir, exist_ok=True)
    return storage.copy_to_local(uri, os.path.join(workdir, os.path.basename(uri)))


def list_folder(storage: Storage, uri: str, what: str, setting: str) -> dict[str, int]:
    listing = list_relative(storage, uri)
    if not listing:
        raise SourceError(f"{what} folder {uri} is empty or missing; set {setting} or check source.root")
    return listing


def build_coco_style(
    *, dataset: str, task: str, split: str, annotation: str, images_dir: str, storage: Storage,
    workdir: str, with_segmentation: bool, rel_path_of: Callable[[str], str] = lambda name: name,
) -> CocoStyleIndex:
    path = local_copy(storage, annotation, workdir)
    source = AnnotationFile(path)
    cats = parse_categories(source)
    listing = list_folder(storage, images_dir, "image", "source.images")
    images = parse_images(source)
    selection = select_images(images, listing, rel_path_of)
    anns = parse_annotations(source, with_segmentation=with_segmentation)
    del source  # a small file's parsed document is no longer needed
    dropped = np.setdiff1d(images.ids, images.ids[selection.rows])
    ann_selection = select_annotations(anns, images, selection, cats, dropped)
    return CocoStyleIndex(
        images=images, anns=anns, selection=selection, ann_selection=ann_selection, listing=listing,
        images_dir=images_dir, join=join,
        dataset=dataset, task=task, split=split, categories=cats, label_format=None,
        fingerprint=combine_fingerprints(annotations=file_sha256(path), images=listing_digest(listing)),
    )
