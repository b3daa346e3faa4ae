"""``python -m activeindex``: the command line (:mod:`activeindex.cli`)."""

from activeindex.cli import main

main()
