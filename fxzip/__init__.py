"""fxzip: merge models trained on different tasks, without training, as torch.fx passes.

    merged = fxzip.merge(model_a, model_b, data=loader)          # ZipIt!
    merged = fxzip.merge(model_a, model_b, data=loader, method="permute")

Informational messages go to the ``logging`` loggers under "fxzip" (e.g.
``logging.getLogger("fxzip").setLevel(logging.INFO)`` with a handler, or
``logging.basicConfig(level=logging.INFO)``); things to change in your call or
model are ``warnings.warn``-ed; errors are raised. The library never prints.
"""
import logging as _logging

from .analysis import AnalysisError, FeatureSpace, GraphAnalysis, analyze
from .cuts import CutPoint, cut_points
from .io import load, save
from .matching import MATCHERS, register_matcher
from .merge import Calibration, calibrate, merge
from .norm import reset_norm_stats
from .permute import permute_channels
from .probes import PROBE_POLICIES, ProbePolicy
from .report import MergeReport
from .rules import register_rule
from .trace import TraceError, register_leaf_module, trace
from .version import __version__

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


__all__ = [
    "merge", "calibrate", "save", "load", "Calibration", "cut_points", "CutPoint", "permute_channels", "reset_norm_stats", "trace", "analyze", "register_rule",
    "register_leaf_module", "register_matcher", "MATCHERS", "MergeReport", "FeatureSpace", "ProbePolicy", "PROBE_POLICIES",
    "GraphAnalysis", "AnalysisError", "TraceError", "__version__",
]
