"""Names for feature spaces that say what they are.

A space's ``name`` is its first producer's node name (``layer1_0_conv2``),
which is stable and what code matches on, but tells a reader little: the
residual stream of ResNet's first stage is "conv1". ``space_label`` names a
space by its role and module paths instead:

* several producers (a residual stream): ``layer1 stream (conv1,
  layer1.0.conv2, layer1.1.conv2)``, scoped by the module path the producers
  share, or else the top-level module most of them sit in;
* one producer: ``layer2.0 hidden (conv1)``; attention's q/k space
  ``blocks.0.attn q.k (qkv)``; the model output ``output (fc)``.

Module paths are read off the space's parameters (``layer1.0.conv2.weight``
belongs to node ``layer1_0_conv2``); a producer without a module keeps its
node name.
"""
from __future__ import annotations

from typing import Any

__all__ = ["space_label"]

_LISTED = 4


def _module_paths(sp: Any) -> list[str]:
    owners = {p.rsplit(".", 1)[0] for p, _, _ in getattr(sp, "params", ()) if "." in p}
    by_node = {o.replace(".", "_"): o for o in owners}
    return [by_node.get(n, n) for n in sp.producers]


def space_label(sp: Any) -> str:
    """A readable name for the analysis's ``FeatureSpace`` ``sp`` (see the module docstring)."""
    paths = _module_paths(sp)
    if not paths:
        return sp.name
    role = "q.k" if sp.bilinear else "output" if sp.touches_output else "hidden"
    if len(paths) == 1:
        parent, _, leaf = paths[0].rpartition(".")
        return f"{parent} {role} ({leaf})" if parent else f"{role} ({leaf})"
    scope = _scope([p.split(".") for p in paths])
    kind = "output" if sp.touches_output else "stream"
    listed = ", ".join(paths[:_LISTED]) + (f" +{len(paths) - _LISTED} more" if len(paths) > _LISTED else "")
    return f"{scope} {kind} ({listed})" if scope else f"{kind} ({listed})"


def _common(parts: list[list[str]]) -> list[str]:
    shared: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        shared.append(level[0])
    return shared[:min(len(p) for p in parts) - 1]  # a module path, never a producer itself


def _scope(parts: list[list[str]]) -> str:
    """The module path all producers sit in, or else the one all but the first
    sit in (the first producer feeds the stream from outside: ResNet's stem
    conv1 before layer1.0.conv2 and layer1.1.conv2 make ``layer1``)."""
    return ".".join(_common(parts) or _common(parts[1:]))
