"""``python -m anyserve.cli``: the same as the ``anyserve`` command."""

from anyserve.cli import main

main()
