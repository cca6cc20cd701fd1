"""How big the validation split must be to fit the calibration temperature (issue 24), in-process on the CPU.

    HF_HUB_OFFLINE=1 python bench/calibration_split.py [--seeds 42,1,2] [--drawn 4000] [--model-cache DIR] [--out FILE]

For each seed: trains the built-in job with the default hyperparameters in this process (``workers.training.recipe``;
the same adapter a job through the API trains), scores the label log-likelihoods of the built-in validation split
(262 items) and of the unseen items among ``--drawn`` built-in items drawn with seed 31337 (those whose text is in
neither the built-in train nor validation split, 2664 of 4000, a text may come more than once as it does in the
generator: a sample of the news the recipe will meet), and
compares on the unseen items the raw probabilities with those calibrated by a temperature fitted on the first 60
validation items (the split before issue 24's measurements) and on all 262. Each ECE comes with a bootstrap 95%
interval, the floor (the mean ECE a perfectly calibrated model with the same confidences shows on as many items) and
the ECE of random 150-item subsets (mean, 95% range, share at or below 0.03). Last, how much the temperature varies
with the draw of the validation items: 200 random draws of 60, 150 and 262 of the unseen items, a temperature
fitted on each, and the ECE it gives on all the unseen items.

``--model-cache DIR``: a folder holding ``models/builtin-v1`` (built there if missing, ~25 s on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from service.jobs.hyperparameters import Hyperparameters, resolve  # noqa: E402
from service.llm import calibration  # noqa: E402
from service.llm.builtin.data import builtin_dataset, generate  # noqa: E402
from service.llm.builtin.model import ensure_builtin_model  # noqa: E402
from service.llm.prompts import LABELS, Example  # noqa: E402
from service.llm.scoring import classify  # noqa: E402
from workers.training.recipe import fit, setup  # noqa: E402
from workers.training.spec import Hooks, TrainingSpec  # noqa: E402

UNSEEN_SEED = 31337
OLD_SPLIT = 60  # the built-in validation split before issue 24's measurements: its first 60 items
RESAMPLES = 1000
DRAWS = 200
SUBSET = 150
GOAL = 0.03


def probs_of(scores: np.ndarray, temperature: float) -> np.ndarray:
    scaled = scores / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    e = np.exp(scaled)
    return e / e.sum(axis=1, keepdims=True)


def ece(probs: np.ndarray, gold: np.ndarray, bins: int = calibration.ECE_BINS) -> float:
    """The same measure as ``service.llm.calibration.ece``, vectorised."""
    top, right = probs.max(axis=1), probs.argmax(axis=1) == gold
    which = np.minimum((top * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += abs(top[mask].mean() - right[mask].mean()) * mask.sum()
    return total / len(gold)


def figures(probs: np.ndarray, gold: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    n, top = len(gold), probs.max(axis=1)
    boot = [ece(probs[i], gold[i]) for i in (rng.integers(0, n, n) for _ in range(RESAMPLES))]
    rows = np.stack([top, (1 - top) / 2, (1 - top) / 2], axis=1)
    floor = [ece(rows, np.where(rng.random(n) < top, 0, 1)) for _ in range(RESAMPLES)]
    subsets = np.array(
        [ece(probs[i], gold[i]) for i in (rng.choice(n, SUBSET, replace=False) for _ in range(RESAMPLES))]
    )
    picked = np.maximum(probs[np.arange(n), gold], 1e-12)
    return {
        "accuracy": round(float((probs.argmax(axis=1) == gold).mean()), 4),
        "nll": round(float(-np.log(picked).mean()), 4),
        "brier": round(float(((probs - np.eye(3)[gold]) ** 2).sum(axis=1).mean()), 4),
        "ece": round(ece(probs, gold), 4),
        "ece_ci95": [round(float(x), 4) for x in np.percentile(boot, [2.5, 97.5])],
        "ece_floor": round(float(np.mean(floor)), 4),
        f"ece_of_{SUBSET}": {
            "mean": round(float(subsets.mean()), 4),
            "range95": [round(float(x), 4) for x in np.percentile(subsets, [2.5, 97.5])],
            f"share_at_most_{GOAL}": round(float((subsets <= GOAL).mean()), 3),
        },
    }


def scores_of(run: Any, items: list[Example]) -> np.ndarray:
    out: list[tuple[float, ...]] = []
    with torch.no_grad():
        for start in range(0, len(items), 32):
            chunk = items[start : start + 32]
            predictions = classify(run.model, run.tokenizer, [e.input for e in chunk], [e.instruction for e in chunk])
            out += [p.label_logprobs for p in predictions]
    return np.asarray(out, dtype=np.float64)


def measure(seed: int, model: Path, drawn: int) -> dict[str, Any]:
    train, validation = builtin_dataset()
    seen = {e.input for e in train + validation}
    unseen = [e for e in generate(drawn, seed=UNSEEN_SEED) if e.input not in seen and e.label is not None]
    root = Path(tempfile.mkdtemp(prefix="flashtune-calibration-split-"))
    spec = TrainingSpec(
        job_id=1,
        base_model="builtin",
        base_source=str(model),
        dataset="builtin",
        dataset_sha256=None,
        train=train,
        validation=validation,
        hp=resolve(Hyperparameters.model_validate({"seed": seed}), "builtin"),
        job_dir=root / "job",
        adapter_dir=root / "adapter",
    )
    started = time.monotonic()
    run = setup(spec, Hooks())
    fit(run)
    run.model.eval()
    trained = time.monotonic() - started
    val_scores, val_gold = scores_of(run, validation), np.array([LABELS.index(str(e.label)) for e in validation])
    scores, gold = scores_of(run, unseen), np.array([LABELS.index(str(e.label)) for e in unseen])
    shutil.rmtree(root, ignore_errors=True)  # the run's checkpoints: nothing is published
    rng = np.random.default_rng(0)
    temperatures = {
        "raw": 1.0,
        f"fitted_on_{OLD_SPLIT}": calibration.fit_temperature(
            val_scores[:OLD_SPLIT].tolist(), val_gold[:OLD_SPLIT].tolist()
        ),
        f"fitted_on_{len(validation)}": calibration.fit_temperature(val_scores.tolist(), val_gold.tolist()),
    }
    draws = {}
    for size in (OLD_SPLIT, 150, len(validation)):
        fitted, eces = [], []
        for _ in range(DRAWS):
            i = rng.choice(len(gold), size, replace=False)
            t = calibration.fit_temperature(scores[i].tolist(), gold[i].tolist())
            fitted.append(t)
            eces.append(ece(probs_of(scores, t), gold))
        draws[str(size)] = {
            "temperature_p10_p50_p90": [round(float(x), 3) for x in np.percentile(fitted, [10, 50, 90])],
            "ece_mean": round(float(np.mean(eces)), 4),
            f"share_at_most_{GOAL}": round(float(np.mean(np.array(eces) <= GOAL)), 3),
        }
    return {
        "seed": seed,
        "train_seconds": round(trained, 1),
        "unseen_items": len(gold),
        "temperatures": {k: round(v, 4) for k, v in temperatures.items()},
        "unseen": {k: figures(probs_of(scores, t), gold, rng) for k, t in temperatures.items()},
        "validation_draws": draws,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,1,2", help="one default built-in job per seed (default 42,1,2)")
    parser.add_argument("--drawn", type=int, default=4000, help="items drawn; the unseen ones are kept (default 4000)")
    parser.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "flashtune-model-cache")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ensure_builtin_model(args.model_cache)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        result = measure(seed, model, args.drawn)
        results.append(result)
        print(f"seed {seed}: temperatures {result['temperatures']} on {result['unseen_items']} unseen items")
        for name, f in result["unseen"].items():
            sub = f[f"ece_of_{SUBSET}"]
            print(
                f"  {name:>14}: accuracy {f['accuracy']:.3f} NLL {f['nll']:.3f} Brier {f['brier']:.3f} "
                f"ECE {f['ece']:.3f} (95% {f['ece_ci95'][0]:.3f}-{f['ece_ci95'][1]:.3f}, floor {f['ece_floor']:.3f}); "
                f"{SUBSET}-item subsets {sub['mean']:.3f} ({sub['range95'][0]:.3f}-{sub['range95'][1]:.3f}), "
                f"<= {GOAL} in {sub[f'share_at_most_{GOAL}']:.0%}"
            )
        for size, d in result["validation_draws"].items():
            print(f"  T fitted on {size:>3} random items: {d}")
    if args.out:
        args.out.write_text(
            json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seeds": results}, indent=2)
        )


if __name__ == "__main__":
    main()
