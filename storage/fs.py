"""Storage URIs through `pyarrow.fs`: a local directory (default), a shared volume, or S3/GCS.

`memory://name/prefix` is fsspec's in-memory filesystem behind pyarrow's `FSSpecHandler`: one
store per process (every `resolve` of a memory:// URI sees the same files), gone when the process
ends. It takes the object-store code paths (no renames, no locks) with no server, which is what the
storage contract tests use it for; a study on it is only useful in one process (no Ray workers)."""

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
    if uri.startswith(MEMORY):
        return memory_filesystem(), "/" + uri[len(MEMORY):].strip("/")
    return pafs.FileSystem.from_uri(uri)


MEMORY = "memory://"


def memory_filesystem() -> pafs.FileSystem:
    """fsspec's process-wide in-memory filesystem as a pyarrow filesystem (the `memory://` scheme)."""
    try:
        import fsspec  # installed with `datasets`; listed in pyproject too
    except ImportError as error:  # pragma: no cover - fsspec comes with datasets
        raise ValueError("storage URI memory://...: needs fsspec (pip install fsspec), "
                         "or give a directory path or an s3:// URI") from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))


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


_SCHEMES = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://", "abfs": "abfs://", "py::fsspec+memory": MEMORY}


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI a user can paste back: `resolve` strips the scheme (s3://bkt/x -> bkt/x), this puts it back.
    Local paths stay plain paths. Everything the service prints goes through here."""
    scheme = _SCHEMES.get(fs.type_name)
    if scheme is None:  # local (or a filesystem without a URI scheme we know): the path as it is
        return path
    return path if path.startswith(scheme) else scheme + path.lstrip("/")


def display(uri_or_path: str) -> str:
    """A storage URI or path for printing: an s3://, gs://... URI is kept as given (never shortened
    to its bucket path); a local path is made absolute."""
    return uri_or_path if not is_local(uri_or_path) else absolute_uri(uri_or_path)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_temp_sibling(fs: pafs.FileSystem, path: str, data: bytes) -> str:
    """`data` in a new temporary sibling of `path` (`<path>.tmp-XXXXXXXX`, which ledger readers
    skip); returns its name. The caller renames or links it into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fault_point("fs.temp_written")  # a kill here leaves the temporary sibling behind
    return tmp


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers never see a partial file.

    On object stores a single PUT is already atomic, so the temporary name is skipped there.
    """
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _write_temp_sibling(fs, path, data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def write_bytes_exclusive(fs: pafs.FileSystem, path: str, data: bytes, *, replace_if_smaller: int = 0) -> bool:
    """Create `path` with `data` unless it already exists; False (nothing written) when it does.

    Local disk and NFS: a temporary sibling is hard-linked to the final name, which fails when the
    name exists (atomic on POSIX filesystems and on NFS, the classic lock-file technique), so of
    many concurrent writers of one name exactly one wins. An existing file shorter than
    `replace_if_smaller` bytes (a write cut short by an older version) is replaced. Object stores:
    one HEAD then one PUT; racing PUTs of one name leave one object (the last), never two.
    """
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _write_temp_sibling(fs, path, data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links (some FUSE/SMB mounts): O_EXCL create instead
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
        except FileExistsError:
            if os.path.getsize(path) >= replace_if_smaller:
                return False
            os.replace(tmp, path)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound and (info.size or 0) >= replace_if_smaller:
        return False
    with fs.open_output_stream(path) as out:
        out.write(data)
    return True


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()
