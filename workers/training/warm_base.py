"""The second job on a base starts warm: the run's base comes from the base cache (``service.llm.base_cache``) when
an earlier job saved it there, and a job that had to quantise it saves it for the next one.

    load_base   at set-up: a hit loads the pre-quantised entry; a miss loads and quantises as before, then copies
                the packed weights to host memory (before LoRA is attached)
    Saving      after set-up, a thread writes that copy into a temporary folder while the job trains
    keep        after the adapter is published: wait for the thread, then evict and rename inside the job's fence

Each step reports a ``base_cache`` event whose ``status`` says what happened: ``hit``, ``miss``, ``saved``,
``evicted``, ``not_saved``, ``unreadable`` (an entry that failed to load: removed, the base loaded from its source),
``off`` (``FLASHTUNE_BASE_CACHE_GIB=0``) or ``not_applicable`` (no quantisation: the CPU's float32 base, or
``quantization: "none"``, loads from its checkpoint as it is). The cache never fails a job: a write that fails is a
``not_saved`` event; only losing the job's lease (the fence) ends the attempt, as for every other write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from service.llm.base_cache import GIB, BaseCache, PendingSave, Snapshot, cache_key, load_entry, snapshot
from service.llm.modeling import LoadPlan, load_model
from workers.training.spec import Hooks, TrainingSpec

log = logging.getLogger("flashtune.base_cache")
EVENT = "base_cache"


@dataclass
class BaseCopy:
    """A quantised base copied to host memory, to be saved under ``key``."""

    key: str
    parts: dict[str, Any]
    snapshot: Snapshot


def quantization_parts(plan: LoadPlan) -> dict[str, Any]:
    """What ``service.llm.modeling.load_model`` quantises with, for the cache key."""
    return {"quant_type": "nf4", "double_quant": True, "compute_dtype": plan.dtype_name, "storage": "uint8"}


def load_base(spec: TrainingSpec, plan: LoadPlan, hooks: Hooks, save: bool = True) -> tuple[Any, BaseCopy | None]:
    """The run's base (without LoRA) and, after a miss that should be saved (``save``: rank 0 of a job), its copy
    in host memory for ``start_saving``."""
    cache = spec.base_cache
    if cache is None:  # tests and benchmarks that build a spec without one
        return load_model(spec.base_source, plan), None
    if plan.quantization != "nf4":
        why = "no CUDA device: the float32 base" if plan.device != "cuda" else "quantization 'none': the bf16 base"
        message = f"base cache not used: {why} loads from its checkpoint as it is, with nothing to quantise"
        hooks.on_event(EVENT, message, {"status": "not_applicable", "device": plan.device})
        return load_model(spec.base_source, plan), None
    if not cache.enabled:
        hooks.on_event(EVENT, "base cache off (FLASHTUNE_BASE_CACHE_GIB=0)", {"status": "off"})
        return load_model(spec.base_source, plan), None
    key, parts = cache_key(spec.base_source, quantization_parts(plan))
    entry = cache.find(key)
    if entry is not None:
        started = time.perf_counter()
        try:
            model = load_entry(entry, plan.dtype, plan.device, spec.base_source)
        except Exception as exc:  # noqa: BLE001 - a damaged or vanished entry: load as if it were not there
            log.warning("base cache entry %s could not be loaded: %s: %s", key, type(exc).__name__, exc)
            with hooks.fence("base_cache"):
                cache.discard(key)
            error = f"{type(exc).__name__}: {exc}"[:500]
            message = "base cache entry could not be loaded: removed; loading the base itself"
            hooks.on_event(EVENT, message, {"status": "unreadable", "key": key, "error": error})
        else:
            seconds = time.perf_counter() - started
            gib = sum(p.stat().st_size for p in entry.iterdir()) / GIB
            message = f"base loaded pre-quantised from the base cache in {seconds:.1f} s ({gib:.2f} GiB)"
            hooks.on_event(EVENT, message, {"status": "hit", "key": key, "seconds": round(seconds, 2), "gib": gib})
            return model, None
    started = time.perf_counter()
    model = load_model(spec.base_source, plan)
    seconds = time.perf_counter() - started
    data: dict[str, Any] = {"status": "miss", "key": key, "seconds": round(seconds, 2)}
    copy = None
    if save:
        try:
            copy = BaseCopy(key, parts, snapshot(model))
            data["snapshot_seconds"] = round(copy.snapshot.seconds, 2)
        except Exception as exc:  # noqa: BLE001 - out of host memory, say: train without saving
            data["snapshot_error"] = f"{type(exc).__name__}: {exc}"[:500]
    saving = f"; copied to host memory in {copy.snapshot.seconds:.1f} s to be saved" if copy else ""
    hooks.on_event(EVENT, f"base not in the base cache: loaded and quantised in {seconds:.1f} s{saving}", data)
    return model, copy


def start_saving(copy: BaseCopy | None, cache: BaseCache | None, hooks: Hooks) -> PendingSave | None:
    """Start writing ``copy`` into the cache in the background (its host memory is freed once written)."""
    if copy is None or cache is None:
        return None
    try:
        return cache.start_save(copy.key, copy.parts, copy.snapshot)
    except OSError as exc:  # too little free disk, or the cache folder cannot be made: train without saving
        data = {"status": "not_saved", "key": copy.key, "reason": f"{type(exc).__name__}: {exc}"}
        hooks.on_event(EVENT, f"base not saved to the base cache: {exc}", data)
        return None


def keep(pending: PendingSave | None, cache: BaseCache | None, hooks: Hooks) -> None:
    """Make ``pending`` an entry (``BaseCache.commit``, inside the job's fence) and report what happened; the
    events are written after the fence is left (the fence holds the job's row)."""
    if pending is None or cache is None:
        return
    result = cache.commit(pending, hooks.fence)
    budget = cache.budget_gib
    for entry in result.evicted:
        gib = entry.bytes / GIB
        message = f"evicted base {entry.key} ({gib:.2f} GiB, least recently used) to keep within {budget:g} GiB"
        hooks.on_event(EVENT, message, {"status": "evicted", "key": entry.key, "gib": gib, "budget_gib": budget})
    data: dict[str, Any] = {
        "status": "saved" if result.saved else "not_saved",
        "key": result.key,
        "gib": result.bytes / GIB,
        "write_seconds": round(result.write_seconds, 2),
        "waited_seconds": round(result.waited_seconds, 2),
        "evicted": [e.key for e in result.evicted],
    }
    if result.saved:
        message = (
            f"base saved to the base cache ({data['gib']:.2f} GiB, written in {result.write_seconds:.1f} s while "
            f"training; waited {result.waited_seconds:.1f} s at the end): the next job on it loads it pre-quantised"
        )
    else:
        data["reason"] = result.reason
        message = f"base not saved to the base cache: {result.reason}"
    hooks.on_event(EVENT, message, data)
