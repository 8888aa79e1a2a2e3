"""Per-space feature statistics, streamed: no activation is ever stored.

Sums are kept in float64; each batch's products run in the features' own
dtype (float32 GEMM is ~2x faster than float64 here) on data shifted by the
first batch's mean, which removes the catastrophic cancellation of the
one-pass formula that gave the reference code negative variances and NaNs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["PackedGram", "SpaceStats", "SpaceObserver", "Workspace", "constant_classes"]

CONSTANT_REL_TOL = 1e-6  # constants closer than this times the space's scale are one value


def constant_classes(constant: torch.Tensor, mean: torch.Tensor, scale: float,
                     rel_tol: float = CONSTANT_REL_TOL) -> torch.Tensor:
    """Which constant features hold the same value: a class id per feature
    (int64; -1 where the feature is not constant).

    Why not the values' own digits: a dead GELU unit sits near -1.2e-7, and its
    twin in a copy computed in another summation order differs from it in the
    third digit, although both are zero on the scale of the space (|x| ~ 1).
    Equal means no gap above ``rel_tol * scale`` (the space's largest RMS
    feature) between sorted neighbours: the constants are sorted and cut where
    a gap exceeds that, so the grouping is linear in their number and has no
    rounding boundary for two nearly equal values to fall on either side of.
    A chain of small gaps joins values farther apart than one tolerance
    (single linkage); constants that differ only by float noise are what it
    is for, and distinct constants of a trained layer differ by far more."""
    classes = torch.full(mean.shape, -1, dtype=torch.int64)
    idx = torch.nonzero(constant).flatten()
    if idx.numel() == 0:
        return classes
    values, order = mean[idx].double().sort()
    gaps = values.diff() > rel_tol * scale
    ids = torch.cat([torch.zeros(1, dtype=torch.int64), gaps.cumsum(0)])
    classes[idx[order]] = ids
    return classes



class PackedGram:
    """The upper triangle of a symmetric Gram matrix, stored as its blocks.

    Why: a space of n stacked features has an (n, n) float64 Gram matrix, and a
    merge holds every space's at once until matching (twelve 2 x 3072-unit MLP
    spaces of a ViT-B are 3.6 GB in full). The observer only ever adds to the
    blocks on and above the diagonal, so storing just those halves the memory;
    the full matrix is built for one space at a time, when it is matched.

    ``blocks``: the row ranges ``(start, end)`` of the blocks; ``flat``: one
    float64 buffer holding block (i, j), i <= j, at ``offsets[(i, j)]``.
    """

    def __init__(self, blocks: list[tuple[int, int]], flat: torch.Tensor | None = None):
        self.blocks = blocks
        self.width = blocks[-1][1] if blocks else 0
        self.offsets: dict[tuple[int, int], int] = {}
        total = 0
        for i, (a0, a1) in enumerate(blocks):
            for j in range(i, len(blocks)):
                b0, b1 = blocks[j]
                self.offsets[(i, j)] = total
                total += (a1 - a0) * (b1 - b0)
        self.flat = flat if flat is not None else torch.zeros(total, dtype=torch.float64)
        if self.flat.numel() != total:
            raise ValueError(f"a packed Gram matrix of {blocks} needs {total} values, got {self.flat.numel()}")

    def block(self, i: int, j: int) -> torch.Tensor:
        """A view of block (i, j), i <= j."""
        (a0, a1), (b0, b1) = self.blocks[i], self.blocks[j]
        start = self.offsets[(i, j)]
        return self.flat[start:start + (a1 - a0) * (b1 - b0)].view(a1 - a0, b1 - b0)

    def diagonal(self) -> torch.Tensor:
        return torch.cat([self.block(i, i).diagonal() for i in range(len(self.blocks))])

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``full()[rows, cols]`` without building the full matrix."""
        starts = torch.tensor([a for a, _ in self.blocks])
        ends = torch.tensor([b for _, b in self.blocks])
        lo, hi = torch.minimum(rows, cols), torch.maximum(rows, cols)  # (i, j) with i <= j: an upper block
        bi = torch.searchsorted(ends, lo, right=True)
        bj = torch.searchsorted(ends, hi, right=True)
        table = torch.zeros(len(self.blocks), len(self.blocks), dtype=torch.long)
        for (i, j), start in self.offsets.items():
            table[i, j] = start
        offset = table[bi, bj]
        index = offset + (lo - starts[bi]) * (ends[bj] - starts[bj]) + (hi - starts[bj])
        return self.flat[index]

    def full(self) -> torch.Tensor:
        """The (n, n) matrix, exactly symmetric: the lower triangle is the upper
        one transposed (inside a diagonal block too)."""
        out = torch.empty(self.width, self.width, dtype=self.flat.dtype, device=self.flat.device)
        for i, (a0, a1) in enumerate(self.blocks):
            d = self.block(i, i)
            out[a0:a1, a0:a1] = torch.triu(d) + torch.triu(d, 1).T
            for j in range(i + 1, len(self.blocks)):
                b0, b1 = self.blocks[j]
                v = self.block(i, j)
                out[a0:a1, b0:b1] = v
                out[b0:b1, a0:a1] = v.T
        return out


class SpaceStats:
    """Mean/covariance/correlation of the stacked features [model 0 | model 1 | ...].

    ``gram`` may be a full matrix or a ``PackedGram``; the n x n results are
    built when asked and not kept (a merge asks once per space), so at most one
    space's full matrices exist at a time."""

    ROWS = 256  # rows per step of the in-place n x n arithmetic (no n x n temporaries)

    def __init__(self, count: float, total: torch.Tensor, gram: "torch.Tensor | PackedGram", shift: torch.Tensor):
        self.count = count
        self.total = total
        self._gram = gram
        self.shift = shift

    @property
    def gram(self) -> torch.Tensor:
        """The full Gram matrix (a fresh tensor when stored packed)."""
        return self._gram.full() if isinstance(self._gram, PackedGram) else self._gram

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.total / self.count

    def variance(self) -> torch.Tensor:
        """The diagonal of ``covariance()``, computed alike, without the n x n matrix."""
        m = self.total / self.count
        diag = self._gram.diagonal() if isinstance(self._gram, PackedGram) else self._gram.diagonal()
        return diag / self.count - m * m

    def correlation_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``correlation()[rows, cols]``, the same values, from the sums alone
        (what the report needs once a space's full matrix is gone)."""
        g = self._gram.entries(rows, cols) if isinstance(self._gram, PackedGram) else self._gram[rows, cols]
        m = self.total / self.count
        cov = g / self.count - m[rows] * m[cols]
        const = self.constant()
        var = self.variance().clamp_min(0)
        safe = torch.where(const, torch.ones_like(var), var)
        corr = (cov / (safe[rows] * safe[cols]).sqrt()).clamp(-1, 1)
        either = const[rows] | const[cols]
        if either.any():
            classes = self.constant_classes()
            equal = (classes[rows] == classes[cols]) & const[rows]
            corr = torch.where(either, equal.to(corr.dtype), corr)
        return corr

    def covariance(self) -> torch.Tensor:
        """A fresh (n, n) matrix: gram / count - outer(m, m), row block by row block."""
        cov = self._gram.full() if isinstance(self._gram, PackedGram) else self._gram.clone()
        cov.div_(self.count)
        m = self.total / self.count
        for r in range(0, cov.shape[0], self.ROWS):
            cov[r:r + self.ROWS].sub_(torch.outer(m[r:r + self.ROWS], m))
        return cov

    def constant(self, rel_tol: float = 1e-12) -> torch.Tensor:
        """Features with (numerically) zero variance on the calibration data:
        variance below ``rel_tol`` times the feature's squared mean or the
        space's largest variance (relative, so scaling a space changes nothing)."""
        var = self.variance()
        scale = torch.maximum(self.mean ** 2, var.max().clamp_min(0))
        return var <= rel_tol * scale

    def scale(self) -> float:
        """The space's largest RMS feature, sqrt(max(mean^2 + variance)): what
        "equal" is relative to for its constants."""
        return float((self.mean ** 2 + self.variance().clamp_min(0)).max().sqrt()) if self.mean.numel() else 0.0

    def constant_classes(self) -> torch.Tensor:
        """``constant_classes`` of this space's features."""
        return constant_classes(self.constant(), self.mean, self.scale())

    def correlation(self) -> torch.Tensor:
        """Pearson correlation; constant features correlate 1 with constants of the
        same value and 0 with everything else (never NaN). A fresh matrix, built
        in place in the covariance's memory."""
        corr = self.covariance()
        const = self.constant()
        var = corr.diagonal().clamp_min(0)
        safe = torch.where(const, torch.ones_like(var), var)
        # sqrt(v_i * v_j), not std_i * std_j: identical features then correlate
        # exactly 1 (v / sqrt(v * v) == 1 in IEEE arithmetic; v / s / s is off by
        # an ulp half the time, which lets exact ties lose to merged clusters).
        for r in range(0, corr.shape[0], self.ROWS):
            rows = corr[r:r + self.ROWS]
            rows.div_(torch.outer(safe[r:r + self.ROWS], safe).sqrt_()).clamp_(-1, 1)
        if const.any():
            corr[const, :] = 0
            corr[:, const] = 0
            idx = torch.nonzero(const).flatten()
            classes = self.constant_classes()[idx]
            corr[idx[:, None], idx[None, :]] = (classes[:, None] == classes[None, :]).to(corr.dtype)
        return corr


def _shifted_rows(chunk: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (channels, samples) = the channel-major ``chunk`` minus ``shift``.

    A token model's features are channel-last (batch, tokens, channels), so
    the channel-major rows are their transpose. Subtracting straight into
    them walks the source with a stride of the width (2.4-6x slower on one
    core at widths 192-4096, measured); a plain transposed copy uses torch's
    blocked transpose, and the subtraction then runs in place on contiguous
    rows. Both give the same bits (the same one subtraction per element)."""
    channel_last = chunk.movedim(0, -1)
    if chunk.dim() > 1 and channel_last.is_contiguous() and out.is_contiguous():
        out.copy_(channel_last.reshape(-1, chunk.shape[0]).T)
        out.sub_(shift[:, None])
    else:
        torch.sub(chunk, shift.view((-1,) + (1,) * (chunk.dim() - 1)), out=out.view(chunk.shape))


class Workspace:
    """Scratch memory the observers of one calibration share (they run one at a
    time): the shifted, channel-major copy of a chunk of samples and the float32
    product of two blocks. Reused from batch to batch, so large activations
    cost no fresh allocation (and no page faults) per probe."""

    def __init__(self, max_floats: int = 1 << 23):
        self.max_floats = max_floats  # 32 MB: bounds the copy, whatever the batch
        self._rows = torch.empty(0)
        self._prod = torch.empty(0)
        self.real_tokens: torch.Tensor | None = None
        """The current batch's (batch, sequence) boolean mask of real tokens, set by
        the calibration before each batch (``fxzip.keyword_inputs``): samples
        laid out over those two axes are counted only where the mask is true."""

    def rows(self, n: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """An (n, cols) float32 view whose rows start 64-byte aligned, so every
        block product runs the same kernel path (exact twins stay exact)."""
        stride = -(-cols // 16) * 16
        if self._rows.numel() < n * stride or self._rows.device != like.device:
            self._rows = torch.empty(n * stride, dtype=torch.float32, device=like.device)
        return self._rows[: n * stride].view(n, stride)[:, :cols]

    def prod(self, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
        if self._prod.numel() < a * b or self._prod.device != like.device:
            self._prod = torch.empty(max(a * b, 1 << 16), dtype=torch.float32, device=like.device)
        return self._prod[: a * b].view(a, b)


def _real_positions(real_tokens: torch.Tensor | None, sample_shape: torch.Size) -> torch.Tensor | None:
    """The flat indices of the samples at real tokens, for features whose sample
    axes are the mask's (batch, sequence) axes: exactly those two, the two
    flattened into one, or batch first and sequence last or second with
    other axes (heads) between or after. None (every sample counts) when
    there is no padding, the axes do not line up with the mask (a feature
    map, a pooled vector) or they do two ways at once."""
    if real_tokens is None or len(sample_shape) < 1:
        return None
    b, t = real_tokens.shape
    shape = tuple(sample_shape)
    if shape[0] == b * t and (len(shape) == 1 or b * t not in shape[1:]):
        # batch and sequence flattened into one axis (GPT-2's Conv1D works on (B*T, C))
        keep = real_tokens.reshape((b * t,) + (1,) * (len(shape) - 1)).expand(shape)
    elif len(shape) < 2 or shape[0] != b:
        return None
    elif len(shape) == 2 and shape[1] == t:
        keep = real_tokens
    elif shape[-1] == t and shape[1] == t:
        return None  # the sequence axis is second or last: ambiguous, so every sample counts
    elif shape[-1] == t:
        keep = real_tokens.view((b,) + (1,) * (len(shape) - 2) + (t,)).expand(shape)
    elif shape[1] == t:
        keep = real_tokens.view((b, t) + (1,) * (len(shape) - 2)).expand(shape)
    else:
        return None
    return keep.reshape(-1).nonzero().squeeze(1).to(real_tokens.device)


@contextmanager
def _ieee_fp32(cuda: bool):
    """Full float32 products on the GPU (no TF32, whatever the user set): TF32's
    10-bit mantissa would make the statistics depend on the device."""
    if not cuda:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class SpaceObserver(nn.Module):
    """Inserted into the side-by-side graph: accumulates one space's statistics
    from the N models' copies of a probe point. Every pixel/token is a sample;
    several probe points of one space pool their samples.

    Per call, the N features (the channel slice ``[offset, offset + size)`` of
    dimension ``dim``) are written, shifted, into one channel-major float32
    matrix ``X`` (rows = the N*size features, columns = samples; one strided
    copy, no ``cat``), in chunks of at most ``Workspace.max_floats``. The Gram
    update ``X X^T`` is computed block by block, upper triangle only (the
    blocks follow model boundaries, so model k's block against model j's has
    the same shape as against itself), each float32 block product added into
    the float64 sums while it is still in cache. Only those upper blocks are
    stored (``PackedGram``); the full matrix mirrors them, so it is exactly
    symmetric.
    """

    BLOCK = 128  # rows per block of the Gram product (GEMMs of 128 x chunk x 128 run near peak)

    def __init__(self, n_models: int, size: int, workspace: Workspace | None = None):
        super().__init__()
        self.n_models, self.size = n_models, size
        width = n_models * size
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.workspace = workspace if workspace is not None else Workspace()
        if size < self.BLOCK // 2:
            # narrow spaces: one product of the whole matrix (blocks this thin run
            # far below the GEMM's peak)
            self._blocks = [(0, width)]
        else:
            parts = -(-size // self.BLOCK)
            edges = [round(i * size / parts) for i in range(parts + 1)]
            self._blocks = [(k * size + a, k * size + b) for k in range(n_models)
                            for a, b in zip(edges, edges[1:])]
        # the blocks on and above the diagonal, the only ones updates add to
        self._packed = PackedGram(self._blocks)
        self.register_buffer("gram", self._packed.flat)
        self._shift32: torch.Tensor | None = None
        # called with the fresh shift before anything is accumulated; under
        # torch.distributed it broadcasts rank 0's (fxzip.distributed.agree_shifts)
        self.agree_shift = None

    def forward(self, *features: torch.Tensor, dim: int, offset: int, weight: float = 1.0,
                masked: bool = False) -> None:
        """``weight``: what each sample of this call counts (probe points weighted
        per point, ``fxzip.probes``); 1.0 adds the sums unscaled. ``masked``: the
        features come from the inputs the padding mask describes
        (``passes.observe``), so only real tokens are samples."""
        size = self.size
        # (size, s1, s2, ...): channel-major views, no copy
        views = [f.narrow(dim, offset, size).movedim(dim, 0) for f in features]
        real = _real_positions(self.workspace.real_tokens, views[0].shape[1:]) if masked else None
        if real is not None:  # padding: only the real tokens' features are samples (a copy of those)
            if real.numel() == 0:
                if self._shift32 is None:  # start anyway: under torch.distributed the shift is agreed on now
                    self._start(views)
                return
            views = [v.reshape(size, -1)[:, real] for v in views]
        if self._shift32 is None:  # first call (or statistics loaded from a state dict)
            self._start(views)
        shift = self._shift32
        shape = views[0].shape
        if views[0].dim() == 1:  # one sample per feature vector
            views = [v.unsqueeze(1) for v in views]
            shape = views[0].shape
        lead = shape[1] if len(shape) > 1 else 1
        rest = views[0][0, 0].numel() if lead else 0
        samples = lead * rest
        if samples == 0:
            return
        step = max(1, min(lead, self.workspace.max_floats // max(1, self.n_models * size * rest)))
        width = self.n_models * size
        for s0 in range(0, lead, step):
            s1 = min(lead, s0 + step)
            p = (s1 - s0) * rest
            x = self.workspace.rows(width, p, views[0])
            for k, v in enumerate(views):
                _shifted_rows(v.narrow(1, s0, s1 - s0), shift[k * size:(k + 1) * size], x[k * size:(k + 1) * size])
            self.total.add_(x.sum(1).double(), alpha=weight)
            self._gram_update(x, weight)
        self.count += samples * weight

    def _start(self, views: list[torch.Tensor]) -> None:
        if not bool(self.started):
            means = [v.reshape(self.size, -1).float().mean(1) if v.dim() > 1 else v.float() for v in views]
            self.shift.copy_(torch.cat(means).double())
            if self.agree_shift is not None:
                self.agree_shift(self.shift)
            self.started.fill_(True)
        self._shift32 = self.shift.float()

    def _gram_update(self, x: torch.Tensor, weight: float = 1.0) -> None:
        with _ieee_fp32(x.is_cuda):
            self._gram_blocks(x, weight)

    def _gram_blocks(self, x: torch.Tensor, weight: float) -> None:
        blocks, ws, packed = self._blocks, self.workspace, self._packed
        for i, (a0, a1) in enumerate(blocks):
            xa = x[a0:a1]
            for j in range(i, len(blocks)):
                b0, b1 = blocks[j]
                prod = ws.prod(a1 - a0, b1 - b0, x)
                torch.mm(xa, x[b0:b1].T, out=prod)
                if weight == 1.0:
                    packed.block(i, j).add_(prod)
                else:
                    packed.block(i, j).add_(prod, alpha=weight)

    def _apply(self, fn, recurse=True):
        # ``.to(device)`` replaces the buffer: the packed view must follow it
        out = super()._apply(fn, recurse)
        self._packed = PackedGram(self._blocks, self.gram)
        return out

    def stats(self) -> SpaceStats:
        """The statistics so far. They share the sums on CPU (no copy of the
        packed Gram matrix); the full matrices are built when asked."""
        gram = PackedGram(self._blocks, self.gram.cpu())
        return SpaceStats(float(self.count), self.total.cpu(), gram, self.shift.cpu())
