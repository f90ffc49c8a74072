"""Whether an output location can be written, checked without writing anything (the `--dry-run` of
`shard` and `train`): an s3:// prefix's bucket exists and answers a listing; a local folder, or the
nearest of its parents that exists, is a folder this process may write into."""
from __future__ import annotations

import os

from core.storage.base import StorageError
from core.storage.storage import Storage
from core.storage.uri import is_s3, local_path, parse_s3


def check_writable(storage: Storage, uri: str) -> str:
    """One line saying what was found at ``uri``; StorageError (one line naming the location and the fix)
    when it cannot be written. On S3 write permission shows only on the first write: a listing proves the
    bucket, the endpoint and the credentials."""
    if is_s3(uri):
        bucket, _key = parse_s3(uri)
        first = next(iter(storage.list(uri)), None)  # a missing bucket: StorageError naming it
        return f"bucket {bucket!r} exists; {uri} {'already holds objects' if first else 'is empty'}"
    path = os.path.abspath(local_path(uri))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageError(f"cannot write {uri}: {existing} is a file, not a folder; choose another location",
                           uri=uri, code="NotADirectory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write {uri}: {existing} is not writable by this user; choose another location "
                           "or fix its permissions", uri=uri, code="AccessDenied")
    if existing == path:
        return f"{uri} exists and is writable"
    return f"{uri} will be created under {existing} (writable)"
