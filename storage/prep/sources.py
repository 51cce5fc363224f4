"""Where a task's raw data comes from, and what identifies it.

- Local sources (a file, a directory tree) are identified by their *content*: sha256 over every file
  (relative path + file digest). Hashing runs once per file version: the digests are memoised
  locally under the file's (size, mtime, inode), so later calls only stat the files. A copy of the
  same data on another machine gets the same identity, hence the same cache fingerprint and the
  same trial keys.
- Hub sources (Hugging Face datasets) are identified by (dataset, config, revision): pin
  `hf_revision` to pin the content.
- Official archives (enwik8, Speech Commands) are identified by their URL (and known checksum).

Offline: with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / SCALING_OFFLINE set, an online source that is
not already in a local cache (HF's, or the downloads folder) fails at once with `SourceUnavailable`,
whose message names the task option that points at local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from typing import Any, Iterable, Iterator

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "SCALING_OFFLINE")
DOWNLOADS_ENV = "SCALING_DOWNLOADS"
DIGEST_MEMO_ENV = "SCALING_DIGEST_MEMO"
DOWNLOAD_TIMEOUT_S = 30.0


class SourceUnavailable(ValueError):
    """A task's data cannot be reached; the message says which option points it at local files."""


def offline() -> str | None:
    """The variable that puts us offline (e.g. 'HF_DATASETS_OFFLINE=1'), or None when online."""
    for var in OFFLINE_VARS:
        value = os.environ.get(var, "").strip().lower()
        if value and value not in ("0", "false", "no", "off"):
            return f"{var}={os.environ[var]}"
    return None


def local_hint(task: str, option: str, what: str, example: str) -> str:
    return (
        f"point the task at local files: set the task option `{option}` to {what}, e.g.\n"
        f"  scaling cache build {task} --option {option}={example}\n"
        f"or in the study file:\n"
        f"  tasks: [{{name: {task}, options: {{{option}: {example}}}}}]"
    )


def unavailable(task: str, source: str, reason: str, hint: str) -> SourceUnavailable:
    return SourceUnavailable(f"{task}: no local source given and {source} cannot be reached ({reason});\n{hint}")


# ---- local files and their content identity ---------------------------------------------------------


def require_path(task: str, option: str, path: str | os.PathLike | None, kind: str = "file") -> str:
    """An existing file/directory named by a task option, made absolute; else a clear error."""
    if path is None:
        raise SourceUnavailable(f"{task}: option `{option}` is not set")
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    ok = os.path.isdir(full) if kind == "dir" else os.path.isfile(full)
    if not ok:
        raise SourceUnavailable(f"{task}: option `{option}`={os.fspath(path)!r}: no such {kind} on this machine")
    return full


def tree_files(root: str, extensions: Iterable[str] | None = None) -> list[str]:
    """Relative paths (posix, sorted) of the regular files under `root`, optionally by suffix.
    Hidden directories and symlinked directories are skipped."""
    suffixes = tuple(extensions) if extensions else None
    out = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
        for name in files:
            if suffixes is None or name.endswith(suffixes):
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(out)


def _memo_path() -> str:
    return os.environ.get(DIGEST_MEMO_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "oscillator-scaling", "source-digests.json"
    )


def _load_memo() -> dict[str, str]:
    try:
        with open(_memo_path()) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict[str, str]) -> None:
    path = _memo_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as handle:
            json.dump(memo, handle)
        os.replace(tmp, path)  # concurrent writers: the last wins, a lost entry is only recomputed
    except OSError:
        pass


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(root: str, relpaths: list[str] | None = None) -> dict[str, Any]:
    """Content identity of a file (`relpaths` None) or of the given files under a directory:
    {"sha256": ..., "files": n, "bytes": total}. Memoised per (path, size, mtime, inode)."""
    if relpaths is None:
        entries = [(os.path.basename(root), root)]
    else:
        entries = [(rel, os.path.join(root, rel)) for rel in relpaths]
    stats = []
    for rel, path in entries:
        st = os.stat(path)
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    key = hashlib.sha256(json.dumps([os.path.abspath(root), stats]).encode()).hexdigest()
    total = sum(s[1] for s in stats)
    memo = _load_memo()
    if key in memo:
        return {"sha256": memo[key], "files": len(entries), "bytes": total}
    if relpaths is None:
        value = file_sha256(root)
    else:
        combined = hashlib.sha256()
        for rel, path in entries:
            combined.update(f"{rel}\0{file_sha256(path)}\n".encode())
        value = combined.hexdigest()
    memo = _load_memo()  # re-read: another process may have added entries meanwhile
    memo[key] = value
    _save_memo(memo)
    return {"sha256": value, "files": len(entries), "bytes": total}


# ---- reading text -----------------------------------------------------------------------------------


def read_text_head(path: str, max_bytes: int | None = None) -> str:
    """A UTF-8 text file, or its first `max_bytes` bytes cut back to the last complete line."""
    with open(path, "rb") as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes)
    if max_bytes is not None and len(data) == max_bytes:
        cut = data.rfind(b"\n")
        data = data[: cut + 1] if cut >= 0 else data
    return data.decode("utf-8", errors="replace")


def iter_documents(path: str, separator: str, max_bytes: int | None = None, chunk_chars: int = 1 << 24) -> Iterator[str]:
    """Documents of a text file split on `separator`, streamed (multi-GB files stay out of memory).
    Empty documents (whitespace only) are skipped. `max_bytes`: stop after about that much input,
    at a document boundary."""
    buffer, consumed = "", 0
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        while True:
            chunk = handle.read(chunk_chars)
            buffer += chunk
            parts = buffer.split(separator)
            if chunk:  # the last part may continue in the next chunk (a separator cut in two rejoins)
                buffer = parts.pop()
            for part in parts:
                consumed += len(part.encode("utf-8")) + len(separator)
                if part.strip():
                    yield part
                if max_bytes is not None and consumed >= max_bytes:
                    return
            if not chunk:
                return


# ---- the Hugging Face hub ---------------------------------------------------------------------------


def hf_load(task: str, hint: str, dataset: str, config: str | None = None, *, split: str | None = None,
            revision: str | None = None, streaming: bool = False):
    """`datasets.load_dataset`, failing with the local-source hint when the hub cannot serve it.

    With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, `datasets` itself answers at once: from its local
    cache when the dataset was downloaded before, else with an error (no retries). SCALING_OFFLINE
    alone stops here, before `datasets` would retry an unreachable hub for ~20 s."""
    name = dataset + (f" ({config})" if config else "")
    reason = offline()
    if reason and reason.startswith("SCALING_OFFLINE"):
        raise unavailable(task, f"the Hugging Face hub dataset {name}", f"offline: {reason}", hint)
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split, revision=revision, streaming=streaming)
    except Exception as error:  # noqa: BLE001 -- ConnectionError, DatasetNotFoundError, offline-mode errors, ...
        why = f"{type(error).__name__}: {error}" + (f"; offline: {reason}" if reason else "")
        raise unavailable(task, f"the Hugging Face hub dataset {name}", why, hint) from error


# ---- official archives ------------------------------------------------------------------------------


def downloads_dir() -> str:
    return os.environ.get(DOWNLOADS_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "oscillator-scaling", "downloads")


def download(task: str, hint: str, url: str, *, sha256: str | None = None) -> str:
    """Fetch `url` once into the downloads folder (temp name + rename) and return the local path."""
    dest = os.path.join(downloads_dir(), url.rstrip("/").rsplit("/", 1)[-1])
    if os.path.exists(dest):
        return dest
    reason = offline()
    if reason:
        raise unavailable(task, url, f"offline: {reason}", hint)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.part-{uuid.uuid4().hex[:8]}"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(total, f"download {os.path.basename(dest)}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise unavailable(task, url, f"{type(error).__name__}: {error}", hint) from error
    if sha256 and digest.hexdigest() != sha256:
        os.remove(tmp)
        raise SourceUnavailable(f"{task}: {url} downloaded with sha256 {digest.hexdigest()}, expected {sha256}")
    os.replace(tmp, dest)
    return dest


def progress(total: int | None, desc: str, unit: str = "B"):
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                disable=None, file=sys.stderr, leave=False)


def local_split_files(task: str, data_dir: str | None, explicit: dict[str, str | None],
                      names: dict[str, list[str]], required: tuple[str, ...]) -> dict[str, str] | None:
    """The local file of each split: an explicit `<split>_file` option, else the first of `names`
    found in `data_dir`. None when no local option is set at all (the task then goes online)."""
    if data_dir is None and not any(explicit.values()):
        return None
    root = require_path(task, "data_dir", data_dir, "dir") if data_dir is not None else None
    out = {}
    for split, candidates in names.items():
        option = f"{split}_file"
        if explicit.get(split):
            out[split] = require_path(task, option, explicit[split])
            continue
        found = [os.path.join(root, c) for c in candidates if root and os.path.isfile(os.path.join(root, c))]
        if found:
            out[split] = found[0]
        elif split in required:
            where = f"in data_dir={data_dir!r} (looked for {', '.join(candidates)})" if root else "(data_dir not set)"
            raise SourceUnavailable(f"{task}: no {split} split {where}; set the task option `{option}` to the {split} file")
    return out
