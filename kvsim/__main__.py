"""``python -m kvsim``: the ``kvsim`` command."""

from kvsim.cli import main

main()
