"""Bases kept quantised between jobs: the NF4 weights one job made, saved so that the next job on the same base
loads them as they are instead of reading the bf16 checkpoint and quantising it again.

    DATA_DIR/cache/bases/<key>/      one entry: a pre-quantised checkpoint that ``from_pretrained`` loads
      config.json                    the base's config, with its ``quantization_config``
      generation_config.json         (when the base has one)
      model.safetensors              packed 4-bit weights, their quantisation states, the unquantised modules
      entry.json                     written last: the key's parts and each file's size

The key hashes everything the packed weights depend on: the resolved base folder and its files' names, sizes and
modification times (a hub snapshot's folder names its commit), the quantisation (NF4, double quantisation, the
compute dtype) and the versions of torch, transformers and bitsandbytes. A different base, dtype or library version
is a different entry; nothing is ever looked up by the base's name alone.

Writes are never half-visible. A job that loaded its base by quantising it copies the packed weights to host memory
(``snapshot``, right after the load, before LoRA is attached) and a thread writes them into a temporary folder
beside the entries (``.tmp-<key>-...``) while the job trains: plain file writes, which release the GIL, so the
training loop does not wait for them. After the job has published its adapter, ``commit`` waits for that thread,
then, inside the job's fence (``Hooks.fence``: only the attempt that still holds the job writes into DATA_DIR),
evicts the least recently used entries until the new one fits the budget and renames the folder into place. An
entry counts only when its ``entry.json`` names files of the sizes found (``find``); anything else - a folder left by
a killed job, a truncated file - is ignored, replaced by the next save and removed by eviction. Evicted entries are
renamed away first (``.trash-...``), then deleted, so a lookup never sees one half-deleted.

The budget (``FLASHTUNE_BASE_CACHE_GIB``, 0: off) bounds the entries on disk. What makes a hit fast is that a warm
host serves the entry's ~4.5 GiB (the 7B shape) from the page cache; the operating system keeps or drops those pages,
nothing here pins them.

Nothing here imports torch at module level (``workers.training.spec`` names ``BaseCache``); ``snapshot`` and
``load_entry`` do, inside.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
ENTRY_FILE = "entry.json"  # written last: an entry without it is not one
WEIGHTS_FILE = "model.safetensors"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
FREE_MARGIN_BYTES = 2 * 2**30  # left free on the disk after a save, for the job's adapter and checkpoints
STALE_SECONDS = 3600.0  # a temporary folder untouched this long belongs to a job that died while writing it
GIB = 2**30

Fence = Callable[[str], AbstractContextManager[None]]


def _no_fence(action: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def library_versions() -> dict[str, str]:
    """The versions the packed format depends on, read without importing the libraries."""
    versions = {}
    for name in ("torch", "transformers", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "none"
    return versions


def source_fingerprint(source: str) -> dict[str, Any]:
    """The resolved base folder and, for each file directly in it, its size and modification time: a checkpoint
    rewritten in place (or a hub snapshot of another commit, another folder) is another base."""
    folder = Path(source).resolve()
    files = {}
    with contextlib.suppress(OSError):
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            stat = path.stat()  # follows a hub snapshot's symlinks to its blobs
            files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"path": str(folder), "files": files}


def cache_key(source: str, quantization: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The entry's key for base ``source`` quantised as ``quantization`` (its type, double quantisation and compute
    dtype), and the parts it hashes (kept in the entry's ``entry.json``)."""
    parts = {
        "format": FORMAT_VERSION,
        "source": source_fingerprint(source),
        "quantization": quantization,
        "versions": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest[:32], parts


# --------------------------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    bytes: int
    last_used: float  # the entry.json's modification time: set when written and on every hit


@dataclass
class SaveResult:
    """What ``commit`` did: ``saved`` or why not (``reason``), the entries it evicted to make room, and its times."""

    saved: bool
    key: str
    bytes: int = 0
    reason: str = ""
    evicted: list[Entry] = field(default_factory=list)
    write_seconds: float = 0.0  # the writer thread's time, in the background
    waited_seconds: float = 0.0  # how long the commit waited for it at the job's end


@dataclass(frozen=True)
class BaseCache:
    """The entries under ``root``, held to ``budget_gib`` on disk (0: the cache is off)."""

    root: Path
    budget_gib: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.budget_gib > 0

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_gib * GIB)

    def find(self, key: str) -> Path | None:
        """The folder of ``key``'s complete entry, its use recorded (least recently used goes first); else None."""
        entry = self._read(self.root / key)
        if entry is None:
            return None
        with contextlib.suppress(OSError):
            os.utime(entry.path / ENTRY_FILE)  # recency: metadata only, no content changes
        return entry.path

    def discard(self, key: str) -> None:
        """Remove ``key``'s entry (one that failed to load); call it inside the job's fence."""
        with contextlib.suppress(OSError):
            _remove(self.root / key)

    def entries(self) -> list[Entry]:
        """The complete entries, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [self._read(p) for p in self.root.iterdir() if not p.name.startswith(".")]
        return sorted((e for e in found if e is not None), key=lambda e: (e.last_used, e.key))

    def _read(self, path: Path) -> Entry | None:
        """``path`` as an entry when its entry.json names files of the sizes found there; else None."""
        try:
            record = json.loads((path / ENTRY_FILE).read_text())
            files: dict[str, int] = record["files"]
            if WEIGHTS_FILE not in files or "config.json" not in files:
                return None
            for name, size in files.items():
                if (path / name).stat().st_size != size:
                    return None
            last_used = (path / ENTRY_FILE).stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return Entry(path.name, path, sum(files.values()), last_used)

    def start_save(self, key: str, parts: dict[str, Any], snapshot: Snapshot) -> PendingSave:
        """Start writing ``snapshot`` as ``key``'s entry, in a thread, into a temporary folder (``commit`` makes it
        an entry). Raises ``OSError`` when the disk has not room for it and ``FREE_MARGIN_BYTES`` more: the job's
        own adapter and checkpoints come first."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < snapshot.bytes + FREE_MARGIN_BYTES:
            raise OSError(errno.ENOSPC, f"{free / GIB:.1f} GiB free, {snapshot.bytes / GIB:.2f} GiB to write")
        pending = PendingSave(self, key, parts, snapshot)
        pending.start()
        return pending

    def commit(self, pending: PendingSave, fence: Fence = _no_fence) -> SaveResult:
        """Wait for ``pending``'s writer, then, inside ``fence("base_cache")``, evict least recently used entries
        until it fits the budget and rename it into place. Raises only what ``fence`` raises (the attempt lost its
        job: nothing is written); any other failure is a ``SaveResult`` that says why nothing was saved."""
        key = pending.key
        waited = pending.wait()
        result = SaveResult(False, key, pending.bytes, write_seconds=pending.seconds, waited_seconds=waited)
        try:
            if pending.error is not None:
                result.reason = f"writing it failed: {type(pending.error).__name__}: {pending.error}"
                return result
            if pending.bytes > self.budget_bytes:
                result.reason = f"{pending.bytes / GIB:.2f} GiB is more than the budget ({self.budget_gib:g} GiB)"
                return result
            with fence("base_cache"):
                if self._read(self.root / key) is not None:  # another job saved the same base meanwhile
                    result.reason = "another job saved it first"
                    return result
                self.sweep()  # leftovers of jobs killed while writing or removing
                result.evicted = self._evict(pending.bytes)
                _remove(self.root / key)  # a broken leftover of the same key, if any
                os.rename(pending.tmp, self.root / key)
            result.saved = True
            return result
        except OSError as exc:  # a full disk, permissions: the job goes on without a cache entry
            result.reason = f"{type(exc).__name__}: {exc}"
            return result
        finally:
            shutil.rmtree(pending.tmp, ignore_errors=True)  # gone once renamed; else the unused copy

    def _evict(self, incoming: int) -> list[Entry]:
        """Remove least recently used entries until ``incoming`` bytes more fit the budget; the removed ones."""
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        evicted = []
        for entry in entries:
            if total + incoming <= self.budget_bytes:
                break
            _remove(entry.path)
            total -= entry.bytes
            evicted.append(entry)
        return evicted

    def evict_all(self, fence: Fence = _no_fence) -> list[Entry]:
        """Remove every entry (the operator's ``rm -r`` does the same while no job runs)."""
        with fence("base_cache"):
            entries = self.entries()
            for entry in entries:
                _remove(entry.path)
        return entries

    def sweep(self, now: float | None = None) -> None:
        """Remove temporary and trash folders that nobody has touched for ``STALE_SECONDS``: left by a job that was
        killed while writing or removing (``commit`` calls it inside the job's fence)."""
        now = time.time() if now is None else now
        with contextlib.suppress(OSError):
            for path in self.root.iterdir():
                if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and now - _newest_mtime(path) > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    with contextlib.suppress(OSError):
        for child in path.iterdir():
            newest = max(newest, child.stat().st_mtime)
    return newest


def _remove(path: Path) -> None:
    """Rename ``path`` away (a lookup never sees it half-deleted), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------- snapshot and writer
@dataclass
class Snapshot:
    """A quantised base as it is saved: its state dict copied to host memory, its config and generation config."""

    tensors: dict[str, Any]  # name -> a contiguous CPU tensor
    config_json: str
    generation_json: str | None
    seconds: float  # the copy's time (on the job's path)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def snapshot(model: Any) -> Snapshot:
    """Copy ``model``'s state (bitsandbytes' packed 4-bit weights with their quantisation states, and the modules
    left unquantised) to host memory, with its config (which carries the ``quantization_config``). Call it before
    LoRA is attached: the state then has the base's own names."""
    started = time.perf_counter()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    generation = getattr(model, "generation_config", None)
    can_generate = generation is not None and getattr(model, "can_generate", lambda: False)()
    return Snapshot(
        tensors=tensors,
        config_json=model.config.to_json_string(use_diff=False),
        generation_json=generation.to_json_string(use_diff=True) if generation is not None and can_generate else None,
        seconds=time.perf_counter() - started,
    )


SAFETENSORS_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, Any], cancelled: Callable[[], bool] = lambda: False) -> int:
    """Write ``tensors`` (contiguous, on the CPU) as one safetensors file and fsync it; returns its size. Each tensor
    goes out as one ``write`` of its own memory (no copy), which releases the GIL while the kernel copies it."""
    import torch

    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[str(tensor.dtype)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for tensor in tensors.values():
            if cancelled():
                raise InterruptedError("the base cache write was cancelled")
            if tensor.numel():
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        out.flush()
        os.fsync(out.fileno())  # renamed into place only once its bytes are on disk
    return 8 + len(raw) + offset


class PendingSave:
    """One entry being written in a thread into a temporary folder beside the entries."""

    def __init__(self, cache: BaseCache, key: str, parts: dict[str, Any], snap: Snapshot) -> None:
        self.key, self.parts = key, parts
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}-", dir=cache.root))
        os.chmod(self.tmp, 0o755)  # readable like the adapters: an API on the same DATA_DIR may load it one day
        self.snapshot: Snapshot | None = snap
        self.error: BaseException | None = None
        self.bytes = snap.bytes
        self.seconds = 0.0
        self.cancelled = False
        self.thread = threading.Thread(target=self._write, name="flashtune-base-cache", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _write(self) -> None:
        started = time.perf_counter()
        try:
            snap = self.snapshot
            assert snap is not None
            files = {}
            (self.tmp / "config.json").write_text(snap.config_json, encoding="utf-8")
            files["config.json"] = (self.tmp / "config.json").stat().st_size
            if snap.generation_json is not None:
                (self.tmp / "generation_config.json").write_text(snap.generation_json, encoding="utf-8")
                files["generation_config.json"] = (self.tmp / "generation_config.json").stat().st_size
            files[WEIGHTS_FILE] = write_safetensors(self.tmp / WEIGHTS_FILE, snap.tensors, lambda: self.cancelled)
            self.bytes = sum(files.values())
            record = {"key": self.key, "parts": self.parts, "files": files, "written_at": time.time()}
            (self.tmp / ENTRY_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")  # last: complete
        except BaseException as exc:  # noqa: BLE001 - reported by commit; the job goes on
            self.error = exc
        finally:
            self.snapshot = None  # the host copy is freed as soon as it is written
            self.seconds = time.perf_counter() - started

    def wait(self) -> float:
        """Wait for the writer; the seconds waited."""
        started = time.perf_counter()
        self.thread.join()
        return time.perf_counter() - started

    def abandon(self) -> None:
        """Stop the writer at its next tensor and remove what it wrote (the job ended without publishing)."""
        self.cancelled = True
        self.thread.join()
        shutil.rmtree(self.tmp, ignore_errors=True)


def load_entry(entry: Path, dtype: Any, device: str, source: str) -> Any:
    """The base from ``entry``, as saved (no quantisation), on ``device``; it names ``source`` as its origin, as a
    base loaded from ``source`` does (the adapter's config records it)."""
    import torch
    from transformers import AutoModelForCausalLM

    place = torch.cuda.current_device() if device == "cuda" else device
    model = AutoModelForCausalLM.from_pretrained(
        str(entry), dtype=dtype, device_map={"": place}, trust_remote_code=False
    )
    model.config._name_or_path = source
    model.name_or_path = source
    return model
