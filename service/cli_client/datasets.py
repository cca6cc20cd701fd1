"""``flashtune datasets upload|list|show``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli_client.http import Api
from service.cli_client.options import DEFAULT_URL, ApiKey, AsJson, Url, json_object
from service.cli_client.output import Columns, cell, pairs, print_result, print_rows, say

datasets_app = typer.Typer(help="Upload, list and show datasets.")
DATASET_COLUMNS: Columns = [
    ("id", "ID"),
    ("format", "FORMAT"),
    ("num_examples", "EXAMPLES"),
    ("num_validation", "VALIDATION"),
    ("label_distribution", "LABELS"),
    ("rejected_count", "REJECTED"),
    ("filename", "FILE"),
    ("created_at", "CREATED"),
]


def show_dataset(dataset: dict[str, Any]) -> None:
    pairs(
        [(key.replace("_", " "), dataset.get(key)) for key, _ in DATASET_COLUMNS[:-1]]
        + [
            ("input fields", dataset.get("input_fields")),
            ("duplicates removed", dataset.get("duplicates_removed")),
            ("unlabelled", dataset.get("unlabelled")),
            ("options", dataset.get("options")),
            ("details", dataset.get("details")),
            ("created", dataset.get("created_at")),
        ]
    )
    for item in (dataset.get("rejected") or [])[:10]:
        say(f"rejected: {cell(item)}")


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, metavar="FILE", help="The file to upload.")
    ],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    format: Annotated[str | None, typer.Option(help="Default: from the file (docs/datasets.md).")] = None,
    options: Annotated[str | None, typer.Option(help="JSON object of importer options, or @file.json.")] = None,
) -> None:
    """Upload a dataset. Instruction or chat JSONL, a labelled CSV, or the finance SQLite database."""
    data: dict[str, str] = {}
    if format:
        data["format"] = format
    parsed = json_object(options, "--options")
    if parsed is not None:
        data["options"] = json.dumps(parsed)
    say(f"uploading {file.name} ({file.stat().st_size:,} bytes)")
    with Api(url, api_key, timeout=600) as api, file.open("rb") as handle:
        dataset = api.call("POST", "/datasets", files={"file": (file.name, handle)}, data=data)
    print_result(dataset, as_json, show_dataset)


@datasets_app.command("list")
def datasets_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the uploaded datasets."""
    with Api(url, api_key) as api:
        datasets = api.get("/datasets")
    print_rows(datasets, DATASET_COLUMNS, as_json)


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="ds-...")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show a dataset. Counts, labels, options, rejected lines."""
    with Api(url, api_key) as api:
        dataset = api.get(f"/datasets/{dataset_id}")
    print_result(dataset, as_json, show_dataset)
