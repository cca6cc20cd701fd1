"""``flashtune adapters list|show|download|alias|aliases|promote``: adapters, and the aliases that name them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli_client.http import Api
from service.cli_client.options import DEFAULT_URL, ApiKey, AsJson, Url, bad_option
from service.cli_client.output import Columns, duration, pairs, print_json, print_result, print_rows, say, table

adapters_app = typer.Typer(help="List, show, download adapters; point aliases at them.")


def promotion_text(promotion: dict[str, Any] | None) -> str | None:
    """A job's ``promote_to`` and its decision, in a line: "promoted to production: macro-F1 0.61 > ..."."""
    if not promotion:
        return None
    reason = f": {promotion['reason']}" if promotion.get("reason") else ""
    return f"{promotion.get('status')} to {promotion.get('alias')}{reason}"


def scores(metrics: dict[str, Any], name: str) -> str | None:
    """ "base -> adapter" of one held-out metric, or None without an evaluation."""
    base, adapter = (metrics.get("base") or {}).get(name), (metrics.get("adapter") or {}).get(name)
    if adapter is None:
        return None
    return f"{base:.3f} -> {adapter:.3f}" if base is not None else f"{adapter:.3f}"


def adapter_row(adapter: dict[str, Any]) -> dict[str, Any]:
    metrics = adapter.get("metrics") or {}
    return {
        **adapter,
        "accuracy": scores(metrics, "accuracy"),
        "macro_f1": scores(metrics, "macro_f1"),
        "items": metrics.get("num_labelled"),
    }


ADAPTER_COLUMNS: Columns = [
    ("name", "NAME"),
    ("aliases", "ALIASES"),
    ("job_id", "JOB"),
    ("base_model", "BASE MODEL"),
    ("dataset", "DATASET"),
    ("accuracy", "ACCURACY base -> adapter"),
    ("macro_f1", "MACRO-F1 base -> adapter"),
    ("items", "HELD-OUT"),
    ("created_at", "CREATED"),
]
AdapterName = Annotated[str, typer.Argument(help="job-<id>, or an alias.")]


@adapters_app.command("list")
def adapters_list(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List adapters. Their held-out scores next to the base model's."""
    with Api(url, api_key) as api:
        adapters = api.get("/adapters")
    print_rows(adapters, ADAPTER_COLUMNS, as_json, row=adapter_row)


@adapters_app.command("show")
def adapters_show(name: AdapterName, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Show an adapter. Its job, scores, durations and files."""
    with Api(url, api_key) as api:
        adapter = api.get(f"/adapters/{name}")
    print_result(adapter, as_json, show_adapter)


def show_adapter(adapter: dict[str, Any]) -> None:
    """Name-value lines (the list's columns, the promotion, input fields, durations), then a table of its files."""
    row, metrics = adapter_row(adapter), adapter.get("metrics") or {}
    items = [(header.split(" base")[0].lower(), row.get(key)) for key, header in ADAPTER_COLUMNS]
    items += [
        ("promotion", promotion_text(adapter.get("promotion"))),
        ("input fields", adapter.get("input_fields")),
        ("durations", {k.removesuffix("_seconds"): duration(v) for k, v in (metrics.get("durations") or {}).items()}),
    ]
    pairs(items)
    files = adapter.get("files") or []
    if files:
        typer.echo("")
        table(files, [(key, key.upper()) for key in files[0]])


@adapters_app.command("download")
def adapters_download(
    name: AdapterName,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: ./<name>.tar.gz")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Download an adapter as a .tar.gz. Weights, config and training_info.json."""
    target = output or Path(f"{name}.tar.gz")
    if target.exists() and not force:
        bad_option("--output", f"{target} exists (pass --force to overwrite it)")
    partial = target.with_name(target.name + ".part")
    size = 0
    with (
        Api(url, api_key, timeout=600) as api,
        api.stream(f"/adapters/{name}/download") as response,
        partial.open("wb") as handle,
    ):
        for chunk in response.iter_bytes():
            handle.write(chunk)
            size += len(chunk)
    os.replace(partial, target)
    say(f"wrote {target} ({size:,} bytes)")
    typer.echo(str(target))


def current_target(api: Api, alias: str) -> str | None:
    """The adapter an alias points at now; None when it does not exist yet."""
    response = api.request("GET", f"/aliases/{alias}", check=False)
    return str(response.json().get("adapter")) if response.status_code == 200 else None


def macro_f1(api: Api, adapter: str) -> str:
    return adapter_row(api.get(f"/adapters/{adapter}"))["macro_f1"] or "not evaluated"


Reason = Annotated[str | None, typer.Option(help="Why, recorded in the adapter's job events.", show_default=False)]


@adapters_app.command("alias")
def adapters_alias(
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    adapter: Annotated[str, typer.Argument(help="The adapter it should name (job-<id>).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    reason: Reason = None,
) -> None:
    """Point an alias at an adapter. /analyze with {"adapter": ALIAS} is then served by it (PUT /aliases/ALIAS)."""
    body = {"adapter": adapter, **({"reason": reason} if reason else {})}
    with Api(url, api_key) as api:
        previous = current_target(api, alias)
        result = api.call("PUT", f"/aliases/{alias}", json=body)
    say(f"{alias}: {previous or 'unset'} -> {result['adapter']}")
    if as_json:
        print_json(result)


ALIAS_COLUMNS: Columns = [("alias", "ALIAS"), ("adapter", "ADAPTER"), ("updated_at", "SET"), ("reason", "REASON")]


@adapters_app.command("aliases")
def adapters_aliases(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the aliases. Each with its adapter, when and why it was set."""
    with Api(url, api_key) as api:
        rows = api.get("/aliases")
    print_rows(rows, ALIAS_COLUMNS, as_json)


@adapters_app.command("promote")
def adapters_promote(
    adapter: Annotated[str, typer.Argument(help="The adapter to promote (job-<id>).")],
    to: Annotated[str, typer.Option("--to", help="The alias to move.")] = "production",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    reason: Reason = None,
) -> None:
    """Promote an adapter by hand. Moves an alias (production) to it, no gate; prints both macro-F1s."""
    body = {"alias": to, **({"reason": reason} if reason else {})}
    with Api(url, api_key) as api:
        previous = current_target(api, to)
        if previous is not None and previous != adapter:
            say(f"{to} was {previous} (held-out macro-F1 base -> adapter: {macro_f1(api, previous)})")
        say(f"{adapter}: held-out macro-F1 base -> adapter: {macro_f1(api, adapter)}")
        result = api.call("POST", f"/adapters/{adapter}/aliases", json=body)
    say(f"{to}: {previous or 'unset'} -> {result['adapter']}")
    if as_json:
        print_json(result)
