"""Scratch files in the system's temporary folder, named so that the ones a killed process left can be found.

A scratch file is ``flashtune-<kind>-<pid>-<random><suffix>``: the process that made it removes it when done, but a
process killed with SIGKILL (or a power cut) cannot, and the file (a private copy of an uploaded SQLite database,
up to the upload limit) stays. ``remove_stale`` deletes those whose process is gone; ``flashtune serve`` calls it at
start-up (``service/api/main.py``). A file of a live process, however old, is left alone, so two servers on one
host never delete each other's work.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

PREFIX = "flashtune-"


def prefix(kind: str) -> str:
    """The name prefix of this process's ``kind`` scratch files: ``tempfile.mkstemp(prefix=prefix("import"))``."""
    return f"{PREFIX}{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(kind: str, folder: Path | None = None) -> list[Path]:
    """Delete the ``kind`` scratch files in ``folder`` (default: the temporary folder) whose process has ended;
    returns them."""
    folder = Path(folder or tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(PREFIX)}{re.escape(kind)}-([0-9]{{1,10}})-")
    removed = []
    for path in folder.glob(f"{PREFIX}{kind}-*"):
        match = pattern.match(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another server's start-up got there first
            path.unlink()
            removed.append(path)
    return removed
