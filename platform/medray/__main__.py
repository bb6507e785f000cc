"""``python -m medray``: the same command line as the ``medray`` console script."""

from medray.cli import main

main()
