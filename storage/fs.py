"""Storage URIs through `pyarrow.fs`: a local directory (default), a shared volume, or S3/GCS."""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs

from storage.faults import fault_point


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI; a plain path is made absolute on the local filesystem."""
    if not uri:
        raise ValueError("empty storage URI: give a directory path or a URI such as s3://bucket/prefix")
    if is_local(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    return pafs.FileSystem.from_uri(uri)


def absolute_uri(uri: str) -> str:
    """A local path made absolute (Ray Tune and remote workers need one); other URIs unchanged."""
    if is_local(uri):
        return resolve(uri)[1]
    return uri


DEFAULT_STUDY_ROOT = "runs"


def study_storage_uri(name: str, storage: str | None) -> str:
    """A study's storage: as given, else runs/<name> under the working directory; made absolute."""
    return absolute_uri(storage or os.path.join(DEFAULT_STUDY_ROOT, name))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers never see a partial file.

    On object stores a single PUT is already atomic, so the temporary name is skipped there.
    """
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fault_point("fs.temp_written")  # a kill here leaves the temporary sibling behind
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()
