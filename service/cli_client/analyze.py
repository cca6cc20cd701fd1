"""``flashtune analyze "text"``: one news text through ``POST /analyze``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from service.cli_client.http import Api
from service.cli_client.options import DEFAULT_URL, ApiKey, AsJson, Url, json_object
from service.cli_client.output import cell, print_result


def analyze(
    text: Annotated[str, typer.Argument(help="The news text.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    adapter: Annotated[
        str | None,
        typer.Option(help="An adapter, an alias (production), 'latest' or 'none'. Default: the server's."),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="0: the label only, no analysis text.", min=0)] = None,
    metadata: Annotated[str | None, typer.Option(help='JSON object, e.g. \'{"star": 4, "actual": "22.4"}\'.')] = None,
    market_context: Annotated[str | None, typer.Option(help='JSON object, e.g. \'{"trend": "down"}\'.')] = None,
) -> None:
    """Analyze a news text. Label, probabilities, importance, reaction, analysis."""
    body: dict[str, Any] = {"text": text}
    extra = {
        "adapter": adapter,
        "max_new_tokens": max_new_tokens,
        "metadata": json_object(metadata, "--metadata"),
        "market_context": json_object(market_context, "--market-context"),
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    with Api(url, api_key) as api:
        result = api.call("POST", "/analyze", json=body)
    print_result(result, as_json, show_analysis)


def show_analysis(result: dict[str, Any]) -> None:
    """The label and its score, the probabilities, importance, reaction and adapter; then the analysis text."""
    probs = "  ".join(f"{k} {v:.2f}" for k, v in (result.get("probs") or {}).items())
    via = f" (alias {result['alias']})" if result.get("alias") else ""
    typer.echo(f"{result['label']} ({result['score']:.2f})   {probs}")
    typer.echo(
        f"importance {cell(result.get('importance'))}  reaction {cell(result.get('market_reaction'))}  "
        f"adapter {cell(result.get('adapter'))}{via}"
    )
    if result.get("analysis"):
        typer.echo(result["analysis"])
