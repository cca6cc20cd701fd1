"""The API as the client commands talk to it: every failure (unreachable, refused, not JSON) is a few lines on stderr
and exit 1, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from service.cli_client.output import cell, fail


def unreachable(url: str, exc: Exception) -> str:
    reason = str(exc).split("] ")[-1].strip() or type(exc).__name__
    return (
        f"cannot reach the FlashTune API at {url} ({reason}): start it with `flashtune serve`, "
        "or point --url / FLASHTUNE_URL at a running one"
    )


def api_error(response: httpx.Response) -> str:
    """The API's error body (``{"error": {"type", "message", "details"}}``) as a few lines."""
    try:
        error = response.json()["error"]
        head = f"{response.status_code} {error.get('type', 'error')}: {error['message']}"
        details = error.get("details")
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}: {response.text[:300]}"
    lines = [head]
    if isinstance(details, list):
        for item in details[:10]:
            if isinstance(item, dict) and "message" in item:
                where = item.get("field") or item.get("line") or item.get("column") or ""
                lines.append(f"  {where}: {item['message']}" if where else f"  {item['message']}")
            else:
                lines.append(f"  {cell(item)}")
    elif details:
        lines.append(f"  {cell(details)}")
    if response.status_code == 401:
        lines.append("  pass --api-key or set FLASHTUNE_API_KEY")
    return "\n".join(lines)


class Api:
    """The API at ``url``: every failure becomes one line and exit 1 (``fail``)."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 120) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self.client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10))
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            fail(f"--url / FLASHTUNE_URL {url!r} is not a URL: {exc}")

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.close()

    def request(self, method: str, path: str, check: bool = True, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            fail(unreachable(self.url, exc))
        except httpx.TimeoutException:
            fail(f"the FlashTune API at {self.url} did not answer {method} {path} in time")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            fail(f"--url / FLASHTUNE_URL {self.url!r} is not an http(s) URL ({exc})")
        except httpx.TransportError as exc:
            fail(f"talking to the FlashTune API at {self.url} failed: {exc}")
        if check and response.status_code >= 400:
            fail(api_error(response))
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            fail(f"{self.url}{path} answered without JSON: is {self.url} a FlashTune API?")

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    def worker_notice(self) -> str | None:
        """``/readyz``'s notice when jobs wait and no worker is alive (None from a server that has none)."""
        response = self.request("GET", "/readyz", check=False)
        try:
            return response.json().get("workers", {}).get("notice")
        except (ValueError, AttributeError):
            return None

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        try:
            with self.client.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    fail(api_error(response))
                yield response
        except httpx.ConnectError as exc:
            fail(unreachable(self.url, exc))
        except httpx.TransportError as exc:
            fail(f"talking to the FlashTune API at {self.url} failed: {exc}")
