"""``python -m service``: ``flashtune serve`` (the composition root is ``service.cli``)."""

import sys

from service.cli import main

main(["serve", *sys.argv[1:]])
