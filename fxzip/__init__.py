"""fxzip: merge models trained on different tasks, without training, as torch.fx passes.

    merged = fxzip.merge(model_a, model_b, data=loader)          # ZipIt!
    merged = fxzip.merge(model_a, model_b, data=loader, method="permute")

Informational messages go to the ``logging`` loggers under "fxzip" (e.g.
``logging.getLogger("fxzip").setLevel(logging.INFO)`` with a handler, or
``logging.basicConfig(level=logging.INFO)``); things to change in your call or
model are ``warnings.warn``-ed; errors are raised. The library never prints.
"""
import logging as _logging

from . import api as _api
from .api import *  # noqa: F403 - the public names, defined or re-exported in fxzip.api

__all__ = list(_api.__all__)

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
