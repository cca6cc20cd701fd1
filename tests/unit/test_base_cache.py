"""service/llm/base_cache.py and workers/training/warm_base.py on the CPU: the key, atomic entries, partial entries
ignored, least-recently-used eviction within the budget, the fence, and a tiny NF4 base (bitsandbytes quantises on
the CPU too) saved and loaded back bit for bit through the same glue a job uses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

bitsandbytes = pytest.importorskip("bitsandbytes")  # imported before any test can keep it out (test_nf4 does too)

from service.llm import base_cache  # noqa: E402
from service.llm.base_cache import (  # noqa: E402
    ENTRY_FILE,
    GIB,
    TMP_PREFIX,
    WEIGHTS_FILE,
    BaseCache,
    Snapshot,
    cache_key,
    load_entry,
    snapshot,
)
from service.llm.modeling import LoadPlan  # noqa: E402
from workers.training import warm_base  # noqa: E402
from workers.training.spec import Hooks  # noqa: E402

NF4 = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16", "storage": "uint8"}


def tiny_base(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_nf4(source: str, plan: LoadPlan | None = None) -> Any:
    """The worker's NF4 load (service.llm.modeling.load_model), on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
    )


def fake_snapshot(nbytes: int) -> Snapshot:
    return Snapshot({"w": torch.zeros(nbytes, dtype=torch.uint8)}, "{}", None, 0.0)


def save(cache: BaseCache, key: str, nbytes: int, fence: Any = None) -> base_cache.SaveResult:
    pending = cache.start_save(key, {"k": key}, fake_snapshot(nbytes))
    return cache.commit(pending, fence) if fence is not None else cache.commit(pending)


def test_the_key_names_the_base_its_files_the_quantisation_and_the_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"x" * 10)
    key, parts = cache_key(str(base), NF4)
    assert cache_key(str(base), NF4)[0] == key and parts["source"]["path"] == str(base.resolve())
    assert cache_key(str(base), {**NF4, "compute_dtype": "fp16"})[0] != key
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"x" * 10)
    assert cache_key(str(other), NF4)[0] != key  # another folder, same bytes: another base
    os.utime(base / "model.safetensors", ns=(1, 1))
    assert cache_key(str(base), NF4)[0] != key  # rewritten in place
    later = cache_key(str(base), NF4)[0]
    monkeypatch.setattr(
        base_cache, "library_versions", lambda: {"torch": "0", "transformers": "0", "bitsandbytes": "0"}
    )
    assert cache_key(str(base), NF4)[0] != later


def test_an_entry_appears_whole_at_commit_and_only_then(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases", 1.0)
    pending = cache.start_save("k1", {}, fake_snapshot(1000))
    pending.wait()
    assert cache.find("k1") is None and pending.tmp.name.startswith(TMP_PREFIX)  # written, not yet an entry
    result = cache.commit(pending)
    assert result.saved and result.bytes >= 1000 and not pending.tmp.exists()
    entry = cache.find("k1")
    assert entry is not None and (entry / ENTRY_FILE).exists()
    assert [p.name for p in cache.root.iterdir()] == ["k1"]


def test_partial_and_damaged_entries_are_ignored_and_replaced(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases", 1.0)
    assert save(cache, "k1", 1000).saved
    weights = cache.root / "k1" / WEIGHTS_FILE
    with open(weights, "r+b") as handle:  # truncated (a crash, a full disk)
        handle.truncate(100)
    assert cache.find("k1") is None and cache.entries() == []
    (cache.root / "k2").mkdir()  # a folder without entry.json: never an entry
    (cache.root / "k2" / WEIGHTS_FILE).write_bytes(b"x")
    (cache.root / "k3").mkdir()
    (cache.root / "k3" / ENTRY_FILE).write_text("{not json")
    assert cache.find("k2") is None and cache.find("k3") is None
    assert save(cache, "k1", 1000).saved  # the damaged one is replaced
    assert cache.find("k1") is not None


def test_least_recently_used_entries_are_evicted_to_fit_the_budget(tmp_path: Path) -> None:
    mib = 2**20
    cache = BaseCache(tmp_path / "bases", 2.5 * mib / GIB)  # room for two 1 MiB entries
    for key in ("a", "b"):
        assert save(cache, key, mib).saved
    old = time.time() - 100
    os.utime(cache.root / "a" / ENTRY_FILE, (old, old))
    os.utime(cache.root / "b" / ENTRY_FILE, (old + 1, old + 1))
    assert cache.find("a") is not None  # a hit: "a" is now the most recently used
    result = save(cache, "c", mib)
    assert result.saved and [e.key for e in result.evicted] == ["b"]
    assert sorted(e.key for e in cache.entries()) == ["a", "c"]
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]  # nothing half-deleted left
    too_big = save(cache, "d", 3 * mib)
    assert not too_big.saved and "budget" in too_big.reason and cache.find("d") is None
    assert sorted(e.key for e in cache.entries()) == ["a", "c"]  # nothing evicted for an entry that cannot fit


def test_nothing_is_written_or_evicted_when_the_fence_refuses(tmp_path: Path) -> None:
    mib = 2**20
    cache = BaseCache(tmp_path / "bases", 1.5 * mib / GIB)
    assert save(cache, "a", mib).saved

    class LeaseLost(Exception):
        pass

    @contextlib.contextmanager
    def refused(action: str) -> Iterator[None]:
        assert action == "base_cache"
        raise LeaseLost(action)
        yield

    pending = cache.start_save("b", {}, fake_snapshot(mib))
    with pytest.raises(LeaseLost):
        cache.commit(pending, refused)
    assert [e.key for e in cache.entries()] == ["a"] and not pending.tmp.exists()


def test_nothing_is_written_without_room_on_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BaseCache(tmp_path / "bases", 1.0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(base_cache, "FREE_MARGIN_BYTES", usage.free)  # the save would leave less than the margin
    recorder = Recorder()
    copy = warm_base.BaseCopy("k", {}, fake_snapshot(1000))
    assert warm_base.start_saving(copy, cache, recorder.hooks()) is None
    assert recorder.statuses() == ["not_saved"] and "free" in recorder.events[0][1]["reason"]
    assert [p.name for p in cache.root.iterdir()] == []


def test_leftovers_of_killed_jobs_are_swept_once_stale(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases", 1.0)
    cache.root.mkdir(parents=True)
    stale, fresh = cache.root / f"{TMP_PREFIX}k-1", cache.root / f"{TMP_PREFIX}k-2"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / WEIGHTS_FILE).write_bytes(b"x")
    old = time.time() - 2 * base_cache.STALE_SECONDS
    for path in (stale / WEIGHTS_FILE, stale):
        os.utime(path, (old, old))
    cache.sweep()
    assert not stale.exists() and fresh.exists()


def test_an_abandoned_save_leaves_nothing(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path / "bases", 1.0)
    pending = cache.start_save("k", {}, fake_snapshot(1000))
    pending.abandon()
    assert not pending.tmp.exists() and cache.entries() == []


def test_a_nf4_base_round_trips_bit_for_bit(tmp_path: Path) -> None:
    source = str(tiny_base(tmp_path / "base"))
    model = load_nf4(source)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    cache = BaseCache(tmp_path / "bases", 1.0)
    key, parts = cache_key(source, NF4)
    assert cache.commit(cache.start_save(key, parts, snapshot(model))).saved
    entry = cache.find(key)
    assert entry is not None
    config = json.loads((entry / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    loaded = load_entry(entry, torch.bfloat16, "cpu", source)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    assert loaded.name_or_path == source  # an adapter trained on it names the base, not the cache entry
    a, b = model.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)


class Recorder:
    """Hooks that record events and fences, and check that no event is written inside a fence (which holds the
    job's row: an event there would wait on itself)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fences: list[str] = []
        self.inside = False

    @contextlib.contextmanager
    def fence(self, action: str) -> Iterator[None]:
        self.fences.append(action)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def event(self, type: str, message: str, data: dict[str, Any]) -> None:
        assert not self.inside, message
        self.events.append((type, data))

    def hooks(self) -> Hooks:
        return Hooks(on_event=self.event, fence=self.fence)

    def statuses(self) -> list[str]:
        return [d["status"] for t, d in self.events if t == "base_cache"]


def test_a_job_saves_its_base_and_the_next_loads_it_and_another_base_evicts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The glue a job runs (warm_base), with the NF4 load on the CPU standing in for the GPU's."""
    from types import SimpleNamespace

    monkeypatch.setattr(warm_base, "load_model", load_nf4)
    plan = LoadPlan("cpu", "nf4", torch.bfloat16, "test")
    first, other = tiny_base(tmp_path / "first"), tiny_base(tmp_path / "other", seed=1)
    cache = BaseCache(tmp_path / "bases", 1.0)

    def job(source: Path) -> tuple[Any, Recorder]:
        recorder = Recorder()
        spec = SimpleNamespace(base_cache=cache, base_source=str(source))
        model, copy = warm_base.load_base(spec, plan, recorder.hooks())  # type: ignore[arg-type]
        pending = warm_base.start_saving(copy, cache, recorder.hooks())
        warm_base.keep(pending, cache, recorder.hooks())
        return model, recorder

    cold, recorder = job(first)
    assert recorder.statuses() == ["miss", "saved"] and recorder.fences == ["base_cache"]
    warm, recorder = job(first)
    assert recorder.statuses() == ["hit"] and recorder.fences == []
    a, b = cold.state_dict(), warm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    size = cache.entries()[0].bytes
    object.__setattr__(cache, "budget_gib", 1.5 * size / GIB)  # room for one of the two bases
    _, recorder = job(other)
    assert recorder.statuses() == ["miss", "evicted", "saved"]
    assert [e.key for e in cache.entries()] == [recorder.events[-1][1]["key"]]


def test_off_and_not_applicable_say_so_and_save_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(warm_base, "load_model", lambda source, plan: object())
    source = str(tmp_path)
    for cache, plan, status in [
        (BaseCache(tmp_path / "bases", 0.0), LoadPlan("cuda", "nf4", torch.bfloat16, ""), "off"),
        (BaseCache(tmp_path / "bases", 1.0), LoadPlan("cpu", "none", torch.float32, ""), "not_applicable"),
        (BaseCache(tmp_path / "bases", 1.0), LoadPlan("cuda", "none", torch.bfloat16, ""), "not_applicable"),
    ]:
        recorder = Recorder()
        spec = SimpleNamespace(base_cache=cache, base_source=source)
        _, copy = warm_base.load_base(spec, plan, recorder.hooks())  # type: ignore[arg-type]
        assert copy is None and recorder.statuses() == [status]
    assert not (tmp_path / "bases").exists()


def test_an_entry_that_fails_to_load_is_removed_and_the_base_loaded_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(warm_base, "load_model", lambda source, plan: "loaded from the source")
    cache = BaseCache(tmp_path / "bases", 1.0)
    plan = LoadPlan("cpu", "nf4", torch.bfloat16, "")  # the CPU stands in for CUDA (load_entry on the CPU)
    key, _ = cache_key(str(tmp_path), warm_base.quantization_parts(plan))
    assert save(cache, key, 100).saved  # an entry whose weights are no model at all
    recorder = Recorder()
    spec = SimpleNamespace(base_cache=cache, base_source=str(tmp_path))
    model, copy = warm_base.load_base(spec, plan, recorder.hooks(), save=False)  # type: ignore[arg-type]
    assert model == "loaded from the source" and copy is None
    assert recorder.statuses() == ["unreadable", "miss"] and recorder.fences == ["base_cache"]
    assert cache.find(key) is None


def test_train_saves_after_publishing_and_abandons_a_save_when_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """recipe.train: the save starts after set-up, is kept only after the adapter is published, and an attempt that
    stops early abandons it (its unfinished copy goes)."""
    from types import SimpleNamespace

    from workers.training import recipe
    from workers.training.spec import Interrupted

    calls: list[str] = []

    class Pending:
        def abandon(self) -> None:
            calls.append("abandon")

    def start(copy: str, cache: str, hooks: Hooks) -> Pending:
        calls.append(f"start {copy}")
        return Pending()

    def finish(run: Any) -> dict[str, Any]:
        calls.append("publish")
        return {"done": True}

    run = SimpleNamespace(base_copy="copy")
    spec = SimpleNamespace(base_cache="cache")
    monkeypatch.setattr(recipe, "setup", lambda spec, hooks, dist: run)
    monkeypatch.setattr(warm_base, "start_saving", start)
    monkeypatch.setattr(warm_base, "keep", lambda pending, cache, hooks: calls.append("keep"))
    monkeypatch.setattr(recipe, "fit", lambda run: calls.append("fit"))
    monkeypatch.setattr(recipe, "finish", finish)
    assert recipe.train(spec, Hooks()) == {"done": True}  # type: ignore[arg-type]
    assert calls == ["start copy", "fit", "publish", "keep", "abandon"] and run.base_copy is None

    def stopped(run: Any) -> None:
        raise Interrupted("stopped at step 3")

    calls.clear()
    run.base_copy = "copy"
    monkeypatch.setattr(recipe, "fit", stopped)
    with pytest.raises(Interrupted):
        recipe.train(spec, Hooks())  # type: ignore[arg-type]
    assert calls == ["start copy", "abandon"]
