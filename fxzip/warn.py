"""``warnings.warn`` pointed at the user's line, however deep in fxzip it is raised.

A fixed ``stacklevel`` is right for one call path only: the same warning is
raised from ``fxzip.merge``, from ``fxzip.sweep`` and from the command line, at
different depths. Walking out of the package's own files (the library and its
passes) finds the caller's frame on every path, as Python 3.12's
``skip_file_prefixes`` does.
"""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn_caller"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _package_dirs() -> tuple[str, ...]:
    dirs = [_HERE]
    passes = sys.modules.get("fxzip.passes")
    if passes is not None:
        dirs += [os.path.abspath(p) for p in getattr(passes, "__path__", [])]
    return tuple(d + os.sep for d in dirs)


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the location of the first frame outside fxzip."""
    inside = _package_dirs()
    frame, level = sys._getframe(1), 2  # stacklevel 2: the frame that called warn_caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
