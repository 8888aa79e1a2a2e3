"""``python -m fxzip ...``: the same command line as the ``fxzip`` entry point."""
from fxzip.cli import main

raise SystemExit(main())
