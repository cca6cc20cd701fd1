"""Docker HEALTHCHECK for both images: ``flashtune-healthcheck api`` or ``flashtune-healthcheck worker``.

api:    GET /healthz on this container's port (standard library only: the slim image has no curl).
worker: a ``flashtune worker`` process is alive and not a zombie, and the database answers. The worker has no
        port to ask; a worker that cannot reach its database cannot claim or finish jobs, so it is unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def api() -> str | None:
    url = f"http://127.0.0.1:{os.environ.get('FLASHTUNE_PORT', '8000')}/healthz"
    with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (a fixed loopback URL)
        return None if response.status == 200 else f"{url} answered {response.status}"


def _worker_alive() -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the process ended while we looked
        if b"worker" in argv and any(arg.endswith(b"flashtune") for arg in argv) and state not in ("Z", "X"):
            return True
    return False


def worker() -> str | None:
    if not _worker_alive():
        return "no live 'flashtune worker' process"
    from sqlalchemy import text

    from service.core.config import Settings
    from service.jobs.db import make_engine

    engine = make_engine(Settings().resolved_database_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return None


def main() -> int:
    checks = {"api": api, "worker": worker}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        print("usage: flashtune-healthcheck api|worker", file=sys.stderr)
        return 2
    try:
        problem = checks[sys.argv[1]]()
    except Exception as exc:  # any failure to check is a failed check
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
