"""What a merge did, per space, as data and as a table."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SpaceReport", "MergeReport"]


@dataclass
class SpaceReport:
    index: int
    name: str
    size: int
    matched: bool
    within: list[int]
    cross: int
    constant: int
    mean_corr: float
    note: str = ""


@dataclass
class MergeReport:
    method: str
    n_models: int
    spaces: list[SpaceReport]
    seconds: dict[str, float] = field(default_factory=dict)
    calib_batches: int = 0
    calib_samples: int = 0
    warnings: list[str] = field(default_factory=list)
    cut: object = None  # the CutPoint of a partial zip (None: full zip)
    macs: dict[str, float] = field(default_factory=dict)  # per input: merged, original, ensemble
    details: dict = field(default_factory=dict)  # method-specific, e.g. details["mudsc"]: the sweep history
    cut_reason: str = ""  # why the partial zip was cut where it was (e.g. the models differ after it)

    def table(self) -> str:
        head = ["space", "size", "within/model", "cross", "const", "corr", "note"]
        rows = [[s.name, str(s.size), ",".join(map(str, s.within)) if s.matched else "-",
                 str(s.cross) if s.matched else "-", str(s.constant),
                 "-" if math.isnan(s.mean_corr) else f"{s.mean_corr:.3f}", s.note] for s in self.spaces]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        zipped = f"partial zip at {self.cut}" if self.cut is not None else "full zip"
        lines = [f"fxzip {self.method}: {self.n_models} models, {zipped}, {len(self.spaces)} spaces, "
                 f"{self.calib_batches} batches"]
        if self.cut_reason:
            lines.append(f"cut: {self.cut_reason}")
        lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        if self.macs:
            lines.append("MACs per input: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.macs.items()))
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
