"""``python -m workers``: ``flashtune worker``. The entry point belongs to the composition root (``service.cli``);
the rest of ``workers`` never imports ``service.cli`` (pyproject.toml, [tool.importlinter])."""

import sys

from service.cli import main

main(["worker", *sys.argv[1:]])
