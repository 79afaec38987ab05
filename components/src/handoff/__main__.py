"""``python -m handoff``: the same CLI as the ``handoff`` command."""

from handoff.cli import main

main()
