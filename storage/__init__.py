"""The feature store: teacher FPN features on disk (zarr or WebDataset), with a manifest and codecs.

A store lives at a local path or an fsspec URL (``s3://bucket/features.zarr``; for S3 the endpoint and
credentials come from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
Imports only numpy, zarr, numcodecs, fsspec and the standard library (tar shards go through ``tarfile``,
never webdataset, which loads torch), so a store is written and read without the training code
(``tests/test_storage_roundtrip.py`` checks it in a fresh process). Nothing is ever unpickled from a store.
"""

from storage.codecs import CODECS, codec_help, codec_names
from storage.errors import StoreError
from storage.inspect import describe
from storage.manifest import LevelSpec, Manifest, ShardRecord
from storage.sample import Sample
from storage.store import create_store, detect_format, open_store

__all__ = [
    "CODECS", "LevelSpec", "Manifest", "Sample", "ShardRecord", "StoreError", "codec_help", "codec_names",
    "create_store", "describe", "detect_format", "open_store",
]
