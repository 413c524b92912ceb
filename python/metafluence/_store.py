"""Crash-safe progress files: atomic writes, checksummed tensor files, resumable chunked stages.

A low-level utility that any layer may import (it imports nothing else from metafluence).

- :func:`atomic_write_bytes` — write a temporary file beside the target, ``fsync`` it,
  ``os.replace`` it over the target and ``fsync`` the directory: after a crash (even SIGKILL or
  power loss) the target is either the old file or the new one, never a torn mix.
- :func:`save_tensors` / :func:`load_tensors` — a dict of tensors plus a JSON-able ``meta`` dict
  with a SHA-256 checksum. With ``.safetensors`` suffix the file is a plain safetensors file
  (readable by any safetensors tool; the checksum and meta sit in its string metadata); any other
  suffix is a ``torch.save`` payload behind an 8-byte magic and the SHA-256 of the payload bytes,
  read back with ``weights_only=True``. Neither format runs
  pickled code on load. A truncated, corrupted or checksum-less file raises
  :class:`CheckpointCorruptError`; it is never silently used.
- :class:`ProgressStore` — a directory of finished *chunks* of a long stage, bound to a hash of
  the stage's configuration; :func:`map_chunks` runs a chunked computation through it so that a
  rerun after a kill recomputes only the unfinished chunks.

The checksum covers the *content*: every tensor's name, dtype, shape and raw bytes, and the meta
dict (``sha256`` over a canonical serialisation), so it is independent of the container.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CheckpointCorruptError",
    "CheckpointForeignError",
    "ProgressStore",
    "atomic_write_bytes",
    "chunk_ranges",
    "config_diff",
    "digest",
    "load_tensors",
    "map_chunks",
    "remove_stray_temps",
    "save_tensors",
]

FORMAT = "metafluence-tensors/1"
_SHA_KEY = "__mf_sha256__"
_FMT_KEY = "__mf_format__"
_META_KEY = "__mf_meta__"
_IDENTITY_KEY = "__mf_identity__"  # in a store chunk's meta: what produced it
_TMP_SUFFIX = ".tmp"
_TORCH_MAGIC = b"MFTENS01"


class CheckpointCorruptError(RuntimeError):
    """A progress/checkpoint file is truncated, corrupted or unverifiable; it was not used."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {str(self.path)!r} is corrupt ({reason}); it was not used")


class CheckpointForeignError(CheckpointCorruptError):
    """A progress file is intact but was written by another computation (another store's
    config, another chunk, other tasks: its identity does not match); it was not used."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        RuntimeError.__init__(
            self,
            f"checkpoint {str(Path(path))!r} was written by another computation ({reason}); "
            "it was not used",
        )
        self.path = Path(path)
        self.reason = reason


# --- atomic writes ---------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir).

    The temporary file is ``.<name>.<random>.tmp`` in the same directory; it is removed on any
    error. A process killed mid-write leaves at most such a temp file, which readers ignore
    (:class:`ProgressStore` deletes them when it opens the directory).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)
    return p


def remove_stray_temps(path: str | os.PathLike) -> None:
    """Delete temp files that a killed :func:`atomic_write_bytes` left for ``path``.

    Only for a path with a single writer (a second live writer's temp file would go too).
    """
    p = Path(path)
    if p.parent.is_dir():
        for f in p.parent.glob(f".{glob.escape(p.name)}.*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                f.unlink()


# --- content hashing -------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _content_sha256(tensors: Mapping[str, Tensor], meta_json: str) -> str:
    """``sha256`` over ``FORMAT``, ``meta_json`` and each tensor's (name, dtype, shape, bytes)."""
    h = hashlib.sha256()

    def put(b: bytes | memoryview) -> None:
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    put(FORMAT.encode())
    put(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        put(name.encode())
        put(str(t.dtype).encode())
        put(json.dumps(list(t.shape)).encode())
        put(_tensor_bytes(t))
    return h.hexdigest()


_PLAIN = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)


def digest(obj: Any, strict: bool = True) -> str | None:
    """SHA-256 hex digest of nested tensors / mappings / sequences / dataclasses / scalars.

    For config fingerprints (``ProgressStore(config={"data": digest(tasks), ...})``): equal
    inputs give equal digests across processes; tensors are hashed by dtype, shape and bytes.
    Any other object raises ``TypeError`` (its ``repr`` may not be stable across processes),
    or, with ``strict=False``, makes the result ``None`` ("cannot fingerprint").
    """
    try:
        return _digest(obj)
    except TypeError:
        if strict:
            raise
        return None


def _digest(obj: Any) -> str:
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(_tensor_bytes(x))
        elif isinstance(x, Mapping):
            h.update(f"M{len(x)}".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        elif is_dataclass(x) and not isinstance(x, type):
            h.update(f"D{type(x).__qualname__}".encode())
            for f in fields(x):
                walk(f.name)
                walk(getattr(x, f.name))
        elif isinstance(x, _PLAIN):
            h.update(f"S{type(x).__name__}:{x!r};".encode())
        else:
            raise TypeError(f"digest: cannot fingerprint a {type(x).__qualname__}")

    walk(obj)
    return h.hexdigest()


# --- checksummed tensor files ----------------------------------------------------------------
def _prepare(tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None):
    out: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"tensor name {k!r}: expected str")
        if not isinstance(v, Tensor):
            raise TypeError(f"tensors[{k!r}]: expected a Tensor, got {type(v).__name__}")
        out[k] = v.detach().to("cpu", copy=True).contiguous()  # own storage (no sharing)
    try:
        meta_json = json.dumps(dict(meta or {}), sort_keys=True, allow_nan=True)
    except TypeError as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from None
    return out, meta_json


def _use_safetensors(p: Path) -> bool:
    return p.suffix == ".safetensors"


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``tensors`` (moved to CPU) and the JSON-able ``meta`` with a checksum.

    ``.safetensors`` suffix: a safetensors file (needs the ``safetensors`` package); otherwise a
    ``torch.save`` file. Both are read back by :func:`load_tensors` without running pickled code.
    """
    p = Path(path)
    data, meta_json = _prepare(tensors, meta)
    sha = _content_sha256(data, meta_json)
    if _use_safetensors(p):
        from safetensors.torch import save

        blob = save(data, metadata={_FMT_KEY: FORMAT, _META_KEY: meta_json, _SHA_KEY: sha})
    else:
        import io

        buf = io.BytesIO()
        torch.save({"format": FORMAT, "tensors": data, "meta": meta_json, "sha256": sha}, buf)
        payload = buf.getvalue()  # zip padding is not content: hash the raw bytes as well
        blob = _TORCH_MAGIC + hashlib.sha256(payload).digest() + payload
    return atomic_write_bytes(p, blob)


def _read_safetensors(p: Path, blob: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors.torch import load

    if len(blob) < 8:
        raise CheckpointCorruptError(p, f"truncated: {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise CheckpointCorruptError(p, f"truncated: header says {n} bytes, file has {len(blob)}")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
        raw_meta = header.get("__metadata__") or {}
        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise CheckpointCorruptError(p, f"unreadable safetensors: {e}") from None
    if not isinstance(raw_meta, dict):
        raise CheckpointCorruptError(p, "unreadable safetensors metadata")
    return tensors, raw_meta


def _read_torch(p: Path, blob: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    import io

    head = len(_TORCH_MAGIC) + 32
    if len(blob) < head or not blob.startswith(_TORCH_MAGIC):
        raise CheckpointCorruptError(
            p, f"not a metafluence tensor file or truncated ({len(blob)} bytes)"
        )
    if hashlib.sha256(blob[head:]).digest() != blob[len(_TORCH_MAGIC) : head]:
        raise CheckpointCorruptError(p, "checksum mismatch (file bytes)")
    try:
        obj = torch.load(io.BytesIO(blob[head:]), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise CheckpointCorruptError(p, f"unreadable torch file: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict):
        raise CheckpointCorruptError(p, "not a metafluence tensor file")
    raw = {_FMT_KEY: obj.get("format"), _META_KEY: obj.get("meta"), _SHA_KEY: obj.get("sha256")}
    return obj["tensors"], {k: v for k, v in raw.items() if isinstance(v, str)}


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from :func:`save_tensors`, verified against the stored checksum.

    Raises:
        FileNotFoundError: no such file.
        CheckpointCorruptError: truncated, corrupted, or without a metafluence checksum.
    """
    p = Path(path)
    blob = p.read_bytes()
    tensors, raw = _read_safetensors(p, blob) if _use_safetensors(p) else _read_torch(p, blob)
    sha, meta_json = raw.get(_SHA_KEY), raw.get(_META_KEY)
    if sha is None or meta_json is None:
        raise CheckpointCorruptError(p, "no metafluence checksum (old format or foreign file)")
    if raw.get(_FMT_KEY) != FORMAT:
        raise CheckpointCorruptError(p, f"unknown format {raw.get(_FMT_KEY)!r}")
    actual = _content_sha256(tensors, meta_json)
    if actual != sha:
        raise CheckpointCorruptError(
            p, f"checksum mismatch: stored {sha[:12]}…, got {actual[:12]}…"
        )
    try:
        meta = json.loads(meta_json)
    except ValueError as e:  # pragma: no cover - the checksum covers meta_json
        raise CheckpointCorruptError(p, f"unreadable meta: {e}") from None
    return tensors, meta


# --- chunked progress ------------------------------------------------------------------------
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):  # tensors and numpy scalars / arrays
        return x.tolist()
    raise TypeError(f"{type(x).__qualname__} is not JSON-serialisable")


def _canonical(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` through JSON (tuples → lists, tensors → lists), keys sorted."""
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True, default=_json_default))
    except TypeError as e:
        raise TypeError(
            f"config must be JSON-serialisable (use digest() for tensors): {e}"
        ) from None


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two (nested) config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            name = f"{prefix}{k}"
            if k not in a or k not in b:
                out.append(name)
            else:
                out += config_diff(a[k], b[k], name + ".")
        return out
    return [] if a == b else [prefix.rstrip(".") or "<config>"]


class ProgressStore:
    """A directory of finished chunks of one long stage, bound to the stage's ``config``.

    Layout: ``manifest.json`` (config, its hash, completion flag) and one checksummed tensor
    file per finished chunk (``<key>.safetensors``, or ``<key>.pt`` without safetensors). Each
    chunk appears only once completely written (atomic rename), so after a SIGKILL every visible
    chunk is whole; leftover ``*.tmp`` files are deleted when the store is opened. One writer per
    directory at a time.

    Every chunk file carries its *identity* inside it (covered by its checksum): the store's
    config hash, its key and whatever the caller adds (``identity=``: e.g. a digest of the
    chunk's tasks). A file whose identity does not match what is asked for (one chunk copied
    over another, a file from a store with another config) is refused like a damaged one:
    reported (``RuntimeWarning`` naming the file) and recomputed, never used.

    Args:
        directory: created if missing.
        config: JSON-able dict of everything that determines the results (hyperparameters,
            :func:`digest` of the inputs). Reopening with a different config raises
            ``ValueError`` naming the differing keys, unless ``overwrite=True`` (then the old
            chunks are deleted).

    Example::

        store = ProgressStore("run/loo", {"items": "task", "data": digest(batch)})
        for k in range(n):
            if not store.done(str(k)):
                store.save(str(k), {"df": compute(k)})
        store.complete()
    """

    MANIFEST = "manifest.json"

    def __init__(
        self, directory: str | os.PathLike, config: Mapping[str, Any], overwrite: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.config = _canonical(config)
        self.config_hash = hashlib.sha256(
            json.dumps(self.config, sort_keys=True).encode()
        ).hexdigest()
        try:
            import safetensors  # noqa: F401

            self._suffix = ".safetensors"
        except ImportError:  # pragma: no cover
            self._suffix = ".pt"
        self.directory.mkdir(parents=True, exist_ok=True)
        man = self._read_manifest()
        if man is not None and man.get("config_hash") != self.config_hash:
            if not overwrite:
                diff = config_diff(man.get("config"), self.config) or ["<config>"]
                raise ValueError(
                    f"progress directory {str(self.directory)!r} was written with a different "
                    f"config (differing keys: {', '.join(diff)}); pass overwrite=True or use "
                    f"another directory"
                )
            self.clear()
            man = None
        self._clean_temps()
        if man is None:
            self._manifest = {
                "format": FORMAT,
                "config": self.config,
                "config_hash": self.config_hash,
                "complete": False,
            }
            self._write_manifest()
        else:
            self._manifest = man

    # -- manifest ---------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        p = self.directory / self.MANIFEST
        if not p.is_file():
            return None
        try:
            man = json.loads(p.read_text())
            if not isinstance(man, dict) or "config_hash" not in man:
                raise ValueError("missing config_hash")
        except ValueError as e:
            raise CheckpointCorruptError(p, f"unreadable manifest: {e}") from None
        return man

    def _write_manifest(self) -> None:
        data = json.dumps(self._manifest, sort_keys=True, indent=1).encode()
        atomic_write_bytes(self.directory / self.MANIFEST, data)

    def _clean_temps(self) -> None:
        for f in self.directory.glob(f".*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                f.unlink()

    # -- chunks -----------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        key = str(key)
        if not _KEY_RE.match(key) or key == self.MANIFEST:
            raise ValueError(f"chunk key {key!r}: use letters, digits, '_', '-', '.'")
        return self.directory / f"{key}{self._suffix}"

    def done(self, key: str) -> bool:
        """Whether chunk ``key`` was completely written (not verified: see :meth:`get`)."""
        return self._path(key).is_file()

    def save(
        self,
        key: str,
        tensors: Mapping[str, Tensor],
        meta: Mapping[str, Any] | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        """Atomically store a finished chunk (overwrites a previous one of the same key), bound
        to this store's config, ``key`` and the JSON-able ``identity``."""
        meta = dict(meta or {})
        if _IDENTITY_KEY in meta:
            raise ValueError(f"meta key {_IDENTITY_KEY!r} is reserved")
        meta[_IDENTITY_KEY] = self._identity(key, identity)
        save_tensors(self._path(key), tensors, meta)

    def _identity(self, key: str, identity: Mapping[str, Any] | None) -> dict[str, Any]:
        extra = _canonical(identity or {})
        return {"store": self.config_hash, "key": str(key), **extra}

    def load(
        self, key: str, identity: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)`` of a finished chunk: ``CheckpointCorruptError`` if damaged,
        :class:`CheckpointForeignError` if written for another store, key or ``identity``."""
        p = self._path(key)
        tensors, meta = load_tensors(p)
        want = self._identity(key, identity)
        got = meta.pop(_IDENTITY_KEY, None)
        if got != want:
            if not isinstance(got, dict):
                raise CheckpointForeignError(p, "it carries no identity (older format)")
            diff = config_diff(got, want)
            parts = [f"{k}: {_short(got.get(k))} ≠ {_short(want.get(k))}" for k in diff]
            raise CheckpointForeignError(p, "; ".join(parts))
        return tensors, meta

    def get(
        self, key: str, identity: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Like :meth:`load`, but ``None`` when the chunk is missing, damaged or foreign.

        A damaged or foreign chunk is reported (``RuntimeWarning`` naming the file), renamed to
        ``<file>.corrupt`` and so recomputed by the caller; it is never used.
        """
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            return self.load(key, identity)
        except CheckpointCorruptError as e:
            warnings.warn(f"{e}; recomputing chunk {key!r}", RuntimeWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                os.replace(p, p.with_name(p.name + ".corrupt"))
            return None

    def keys(self) -> list[str]:
        """Keys of the finished chunks (sorted)."""
        n = len(self._suffix)
        return sorted(
            f.name[:-n]
            for f in self.directory.glob(f"*{self._suffix}")
            if not f.name.startswith(".") and f.is_file()
        )

    def complete(self, meta: Mapping[str, Any] | None = None) -> None:
        """Mark the stage finished (optionally recording a JSON-able ``meta``)."""
        self._manifest["complete"] = True
        if meta is not None:
            self._manifest["meta"] = _canonical(meta)
        self._write_manifest()

    @property
    def is_complete(self) -> bool:
        return bool(self._manifest.get("complete", False))

    def clear(self) -> None:
        """Delete the store's own files (manifest, chunks, ``*.corrupt``, temp files) only."""
        own = [self.directory / self.MANIFEST]
        own += [self._path(k) for k in self.keys() if _KEY_RE.match(k)]
        own += list(self.directory.glob(f"*{self._suffix}.corrupt"))
        own += list(self.directory.glob(f".*{_TMP_SUFFIX}"))
        for f in own:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    def __repr__(self) -> str:
        return (
            f"ProgressStore({str(self.directory)!r}, chunks={len(self.keys())}, "
            f"complete={self.is_complete})"
        )


def _short(v: Any) -> str:
    """A value for a message: long hex digests cut to 12 characters."""
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return f"{text[:12]}…" if len(text) > 16 else text


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of ``size``."""
    if int(size) < 1:
        raise ValueError(f"chunk size {size}: expected >= 1")
    return [(s, min(s + int(size), int(n))) for s in range(0, int(n), int(size))]


def map_chunks(
    compute: Callable[[tuple[int, int]], Mapping[str, Tensor]],
    n: int,
    size: int = 1,
    store: ProgressStore | None = None,
    imap: Callable[[Callable[..., Any], Sequence[tuple[int, int]]], Iterable[Any]] = map,
    progress: Any = None,
) -> list[dict[str, Tensor]]:
    """Run ``compute((start, stop))`` for each chunk of ``range(n)``; results in chunk order.

    With a ``store``, chunks already in it are loaded instead of recomputed (a damaged one is
    reported and recomputed), each newly computed chunk is saved as soon as it is done (key
    ``"<start>-<stop>"``), and the store is marked complete at the end. ``imap`` may be a
    process pool's ordered ``imap`` (``compute`` must then be picklable / fork-inherited).
    ``progress``: an object with ``update(k)`` (e.g. a tqdm bar), advanced per item.
    """
    ranges = chunk_ranges(n, size)
    results: dict[tuple[int, int], dict[str, Tensor]] = {}
    pending: list[tuple[int, int]] = []
    for r in ranges:
        got = store.get(_chunk_key(r)) if store is not None else None
        if got is None:
            pending.append(r)
        else:
            results[r] = got[0]
            if progress is not None:
                progress.update(r[1] - r[0])
    it: Iterator[Any] = iter(imap(compute, pending))
    for r in pending:
        out = {k: v.detach() for k, v in dict(next(it)).items()}
        if store is not None:
            store.save(_chunk_key(r), out, {"start": r[0], "stop": r[1]})
        results[r] = out
        if progress is not None:
            progress.update(r[1] - r[0])
    if store is not None:
        store.complete({"n": int(n), "chunks": len(ranges)})
    return [results[r] for r in ranges]


def _chunk_key(r: tuple[int, int]) -> str:
    return f"{r[0]:08d}-{r[1]:08d}"
