"""No request pays a CUDA-graph capture (service/serving/engine.py): on the CPU, with a stand-in for the graphs, the
scoring graphs are captured by the batcher's thread between requests (after the base loads: the probe texts' widths
at every row bucket of their pass, up to batch_max_size, so that a news item of ordinary length meets no capture
after the warm-up; every shape again after an adapter loads), never inside a request's pass, and the answers are
those of eager scoring."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from service.core.config import Settings
from service.core.layout import AdapterRef
from service.llm.scoring_graphs import ScoringGraphs, same_pass

TEXTS = ["美联储宣布降息25个基点，市场预期进一步宽松", "某公司季度亏损扩大，股价盘前下跌", "Oil output steady"]


class _EagerReplay:
    def __init__(self, run: Any) -> None:
        self.run, self.out = run, run()

    def replay(self) -> None:
        self.out.copy_(self.run())


def _wait_warm(server: Any, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while server.warming and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.warming


def _adapter(settings: Settings, base: Path, name: str) -> AdapterRef:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    folder = settings.layout.adapters / name
    model.save_pretrained(str(folder))
    (folder / "training_info.json").write_text(json.dumps({"dataset": "test", "input_fields": []}))
    return AdapterRef(name, folder)


def test_scoring_graphs_are_captured_between_requests(
    builtin_model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.serving import adapters
    from service.serving.engine import PROBE_TEXTS, ModelServer

    serving: list[bool] = [False]  # inside a request's pass
    captures: list[bool] = []  # for each capture: whether a request's pass was running

    def capture(self: ScoringGraphs, run: Any) -> tuple[Any, torch.Tensor]:
        captures.append(serving[0])
        graph = _EagerReplay(run)
        return graph, graph.out

    monkeypatch.setattr(adapters, "_graphs_wanted", lambda settings: True)
    monkeypatch.setattr(ScoringGraphs, "_capture", capture)
    settings = Settings(data_dir=tmp_path, base_model=str(builtin_model_cache), device="cpu", batch_max_size=8)
    settings.ensure_dirs()
    adapter = _adapter(settings, builtin_model_cache, "job-1")
    server = ModelServer(settings)
    serve = server._serve

    def flagged(*args: Any) -> Any:
        serving[0] = True
        try:
            return serve(*args)
        finally:
            serving[0] = False

    monkeypatch.setattr(server, "_serve", flagged)
    assert not server.warming
    first = server.submit(TEXTS[0], None, 0)  # loads the base: eager, then the probe and its captures
    _wait_warm(server)
    probed = len(captures)
    per_width = 1 + 2 * len(same_pass(2, settings.batch_max_size))  # one pass at 1 row, two at 2, 4 and 8 rows
    assert per_width == 7 and probed == len(PROBE_TEXTS) * per_width  # each probe width at every bucket

    def burst(texts: list[str], who: AdapterRef | None) -> list[Any]:
        with ThreadPoolExecutor(len(texts)) as pool:
            return list(pool.map(lambda t: server.submit(t, who, 0), texts))

    for rows in (1, 2, 3, 4, 8):  # a news item as long as the first probe text: its graphs were captured
        answers = burst(TEXTS[:1] * rows, None)
        assert all(a.prediction.label == first.prediction.label for a in answers)
    _wait_warm(server)
    after_first_round = len(captures)
    assert after_first_round == probed
    eager = server.analyze(TEXTS, adapter, 0)  # loads the adapter: the weights change, every graph is dropped
    assert server.warming
    _wait_warm(server)
    assert len(captures) > after_first_round
    again = burst(TEXTS, adapter)
    assert [a.prediction.label for a in again] == [a.prediction.label for a in eager]
    for a, b in zip(again, eager, strict=True):
        assert a.prediction.probs == pytest.approx(b.prediction.probs, abs=1e-4)
    assert captures and not any(captures)  # no capture ever ran inside a request's pass


def test_on_the_cpu_nothing_warms(builtin_model_cache: Path, tmp_path: Path) -> None:
    """Without CUDA graphs (the CPU) there is nothing to capture: never warming, and wake-ups are harmless."""
    from service.serving.engine import ModelServer

    server = ModelServer(Settings(data_dir=tmp_path, base_model=str(builtin_model_cache), device="cpu"))
    server.submit(TEXTS[0], None, 0)
    assert server.ready and not server.warming
    server._batcher.wake()
    assert server.submit(TEXTS[1], None, 0).prediction.label
    assert not server.warming
