"""The ``fxzip`` command line, a client of the library: ``main`` is the console
entry point (``fxzip = "fxzip.cli:main"``; ``python -m fxzip``).

Modules: ``parser`` (the arguments, ``main``), ``commands`` (what ``fxzip merge``,
``inspect`` and ``sweep`` do), ``checkpoints`` (checkpoint files from user
paths), ``images`` (calibration data from folders, archives and tensor files),
``inspection`` (``fxzip inspect``), ``sweep`` (``fxzip sweep``) and ``demo``
(``fxzip demo``).

The layering rule: this package imports the library (``fxzip.*``); the library
(every other module of ``fxzip``, and ``fxzip.passes``) never imports it, so
``import fxzip`` loads no command-line code.
"""
from .parser import main

__all__ = ["main"]
