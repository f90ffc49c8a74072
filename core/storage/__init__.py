"""One storage interface over URIs (local paths, ``file://``, ``s3://``): :class:`Storage` routes each
URI to its scheme's backend. The names below are the whole public surface."""

from core.storage.base import Backend, ObjectInfo, StorageConfig, StorageError
from core.storage.storage import Storage
from core.storage.uri import is_s3, join, parse_s3

__all__ = ["Backend", "ObjectInfo", "Storage", "StorageConfig", "StorageError", "is_s3", "join", "parse_s3"]
