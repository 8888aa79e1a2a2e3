"""fxzip's public API, in one place: every name a user imports from ``fxzip``.

The package root re-exports exactly this module's ``__all__``. Anything not
listed here (the stages, the analysis internals, the command line in
``fxzip.cli``) may change between versions.

Merging:
    ``merge``, ``calibrate`` / ``Calibration``, ``cut_points`` / ``CutPoint``,
    ``MergeReport``, ``ProbePolicy`` / ``PROBE_POLICIES``.
Results:
    ``save``, ``load``.
Helpers on single models:
    ``permute_channels`` (the invariance merges rely on), ``reset_norm_stats``,
    ``trace``, ``analyze`` / ``GraphAnalysis`` / ``FeatureSpace``.
Extending:
    ``register_rule`` (how an op maps channel spaces), ``register_matcher``
    (a matching algorithm) / ``MATCHERS``, ``register_leaf_module`` (a module
    traced as one call).
Errors:
    ``TraceError``, ``AnalysisError``.
"""
from .analysis import AnalysisError, FeatureSpace, GraphAnalysis, analyze
from .calibration import Calibration
from .cuts import CutPoint, cut_points
from .io import load, save
from .matching import MATCHERS, register_matcher
from .merge import calibrate, merge
from .norm import reset_norm_stats
from .permute import permute_channels
from .probes import PROBE_POLICIES, ProbePolicy
from .report import MergeReport
from .rules import register_rule
from .trace import TraceError, register_leaf_module, trace
from .version import __version__

__all__ = [
    "merge", "calibrate", "Calibration", "cut_points", "CutPoint", "MergeReport", "ProbePolicy", "PROBE_POLICIES",
    "save", "load",
    "permute_channels", "reset_norm_stats", "trace", "analyze", "GraphAnalysis", "FeatureSpace",
    "register_rule", "register_matcher", "MATCHERS", "register_leaf_module",
    "TraceError", "AnalysisError", "__version__",
]
