"""``python -m stgen``: the command line (:mod:`stgen.cli`)."""

from stgen.cli import main

main()
