"""Client commands of ``flashtune``: talk to a running server by URL and key.

    flashtune jobs submit|list|show|watch|cancel     flashtune datasets upload|list     flashtune analyze "text"

Tables for people, ``--json`` for scripts; ``watch`` (and ``submit --watch``) draws a progress bar until the
job ends. The server comes from ``--url`` / ``FLASHTUNE_URL`` and the key from ``--api-key`` / ``FLASHTUNE_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")


def _client(args: argparse.Namespace) -> httpx.Client:
    key = args.api_key or os.environ.get("FLASHTUNE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=600)


def _call(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            sys.exit(
                f"error {response.status_code}: {error['message']}"
                + (f" {error['details']}" if error.get("details") else "")
            )
        except (ValueError, KeyError):
            sys.exit(f"error {response.status_code}: {response.text[:500]}")
    return response.json()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) if row.get(c) is not None else "-" for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    p = job["progress"]
    filled = int(width * (p.get("fraction") or 0))
    loss, eta = p.get("loss"), p.get("eta_seconds")
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {job['status']:<9} step {p.get('step', 0)}/{p.get('total_steps', 0)}"
        f" epoch {p.get('epoch', 0):.2f}/{p.get('total_epochs', 0)} loss {loss if loss is not None else '-'}"
        f" {p.get('tokens_per_second') or 0:.0f} tok/s ETA {eta if eta is not None else '-'}s"
    )


def watch(client: httpx.Client, job_id: int, interval: float = 0.5) -> dict[str, Any]:
    job: dict[str, Any] = _call(client.get(f"/jobs/{job_id}"))
    while True:
        print("\r" + progress_line(job), end="", file=sys.stderr, flush=True)
        if job["status"] in FINAL:
            print(file=sys.stderr)
            return job
        time.sleep(interval)
        job = _call(client.get(f"/jobs/{job_id}"))


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    p = job["progress"]
    return {**job, "step": f"{p.get('step', 0)}/{p.get('total_steps', 0)}", "loss": p.get("loss")}


def _print(args: argparse.Namespace, data: Any, columns: list[str] | None = None) -> None:
    if args.json or columns is None:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        print(_table(data if isinstance(data, list) else [data], columns))


JOB_COLUMNS = ["id", "name", "status", "dataset", "step", "loss", "adapter", "created_at"]


def jobs_command(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "submit":
            hyper = json.loads(args.hyperparameters) if args.hyperparameters else {}
            body = {"dataset": args.dataset, "hyperparameters": hyper}
            body.update({k: v for k, v in (("name", args.name), ("base_model", args.base_model)) if v})
            job = _call(client.post("/jobs", json=body))
            job = watch(client, job["id"]) if args.watch else job
            _print(args, _summary(job), JOB_COLUMNS)
        elif args.action == "list":
            params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
            page = _call(client.get("/jobs", params=params))
            _print(args, [_summary(j) for j in page["data"]], JOB_COLUMNS)
        elif args.action == "show":
            _print(args, _call(client.get(f"/jobs/{args.id}")))
        elif args.action == "watch":
            _print(args, _summary(watch(client, args.id)), JOB_COLUMNS)
        elif args.action == "cancel":
            _print(args, _summary(_call(client.post(f"/jobs/{args.id}/cancel"))), JOB_COLUMNS)


def datasets_command(args: argparse.Namespace) -> None:
    columns = ["id", "format", "num_examples", "label_distribution", "rejected_count", "filename"]
    with _client(args) as client:
        if args.action == "upload":
            path = Path(args.file)
            data: dict[str, str] = {}
            if args.format:
                data["format"] = args.format
            if args.options:
                data["options"] = args.options
            print(f"uploading {path.name} ({path.stat().st_size} bytes)", file=sys.stderr)
            with path.open("rb") as handle:
                dataset = _call(client.post("/datasets", files={"file": (path.name, handle)}, data=data))
            _print(args, dataset, columns)
        else:
            _print(args, _call(client.get("/datasets")), columns)


def analyze_command(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"text": args.text, "adapter": args.adapter}
    if args.max_new_tokens is not None:
        body["max_new_tokens"] = args.max_new_tokens
    with _client(args) as client:
        result = _call(client.post("/analyze", json=body))
    if args.json:
        _print(args, result)
        return
    probs = "  ".join(f"{k} {v:.2f}" for k, v in result["probs"].items())
    print(f"{result['label']} ({result['score']:.2f})   {probs}")
    print(f"importance {result['importance']}  reaction {result['market_reaction']}  adapter {result['adapter']}")
    if result["analysis"]:
        print(result["analysis"])


def add_commands(sub: Any) -> None:
    """Register the client commands on the ``flashtune`` argument parser."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=os.environ.get("FLASHTUNE_URL", "http://127.0.0.1:8000"))
        parser.add_argument("--api-key", dest="api_key")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    jobs = sub.add_parser("jobs", help="submit, list, show, watch and cancel training jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit")
    submit.add_argument("--dataset", default="builtin")
    submit.add_argument("--name")
    submit.add_argument("--base-model", dest="base_model")
    submit.add_argument("--hyperparameters", help="JSON, e.g. '{\"epochs\": 2}'")
    submit.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    listing = actions.add_parser("list")
    listing.add_argument("--status")
    listing.add_argument("--limit", type=int, default=20)
    for name in ("show", "watch", "cancel"):
        actions.add_parser(name).add_argument("id", type=int)
    for parser in actions.choices.values():
        common(parser)
    jobs.set_defaults(func=jobs_command)

    datasets = sub.add_parser("datasets", help="upload and list datasets")
    d_actions = datasets.add_subparsers(dest="action", required=True)
    upload = d_actions.add_parser("upload")
    upload.add_argument("file")
    upload.add_argument("--format")
    upload.add_argument("--options", help="JSON object of importer options")
    common(upload)
    common(d_actions.add_parser("list"))
    datasets.set_defaults(func=datasets_command)

    analyze = sub.add_parser("analyze", help="analyze a news text")
    analyze.add_argument("text")
    analyze.add_argument("--adapter", default="latest")
    analyze.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    common(analyze)
    analyze.set_defaults(func=analyze_command)
