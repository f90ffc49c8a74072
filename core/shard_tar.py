"""The shard container: plain POSIX tars whose samples are adjacent members sharing a key
(docs/data_formats.md#shards). One writer (deterministic bytes) and one reader (samples grouped by
key, with byte offsets for resuming), used by sharding, verification, training and evaluation alike.

Member names split as webdataset's ``base_plus_ext`` does (key = the path up to the first dot of the
file name, extension = the rest, lower-cased), so stock ``webdataset`` reads the same samples. The
rule is written out here because importing webdataset imports torch (~0.5 GB in every shard worker).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these too


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/000123.image.png"`` -> ``("dir/000123", "image.png")``; None for a name without a dot."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


class DeterministicTarWriter:
    """Writes samples as adjacent tar members with fixed metadata (mtime 0, owner "", mode 0444).

    Headers come from `tarfile.TarInfo.tobuf`; the member bytes are written directly (no
    `TarFile.addfile`, which copies every member through 16 KiB reads and costs ~30% of a shard
    task's CPU). The layout is what `tarfile` writes: header, data padded to 512 B, two zero blocks,
    and zero padding to a whole 10 KiB record. Members of a sample go in sorted extension order."""

    def __init__(self, sink: Any) -> None:
        self._sink, self._offset = sink, 0

    def _emit(self, data: bytes) -> None:
        self._sink.write(data)
        self._offset += len(data)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            try:  # plain USTAR for ASCII names up to 255 bytes; PAX only where a name needs it
                header = info.tobuf(tarfile.USTAR_FORMAT)
            except ValueError:
                header = info.tobuf(tarfile.PAX_FORMAT)
            self._emit(header)
            self._emit(data)
            self._emit(tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._emit(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self._emit(tarfile.NUL * (-self._offset % tarfile.RECORDSIZE))


def _everything(index: int) -> bool:
    return True


def iter_tar_samples(stream: BinaryIO, first: int = 0, want: Callable[[int], bool] = _everything
                     ) -> Iterator[tuple[int, dict[str, Any] | None, int]]:
    """``(index, members, next_offset)`` per sample of a shard stream, in order.

    ``members`` maps ``"__key__"`` to the key and each extension to its bytes, or is None for a
    sample ``want(index)`` declines: its data is skipped by tarfile without being copied. ``index``
    counts from ``first`` (the caller's position of the stream's first sample); ``next_offset`` is
    where the next sample starts, relative to ``stream``, so a reader can reopen there. Members whose
    key changes back to an earlier one start a new sample (verification reports that as
    non-adjacent). Raises tarfile.TarError on a broken tar."""
    index, key, members, end = first - 1, None, None, 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            tar.members = []  # stream mode would otherwise keep every TarInfo of the shard
            if not info.isreg() or _SKIP_META.match(info.name):
                continue
            split = split_member_name(info.name)
            if split is None:
                continue
            prefix, suffix = split
            if prefix != key:
                if key is not None:
                    yield index, members, info.offset
                index, key = index + 1, prefix
                members = {"__key__": prefix} if want(index) else None
            if members is not None:
                members[suffix.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
            end = info.offset_data + info.size + (-info.size % tarfile.BLOCKSIZE)
    if key is not None:
        yield index, members, end
