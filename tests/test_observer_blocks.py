"""SpaceObserver's blocked Gram update (wide spaces, chunked samples) against a float64 reference."""
from __future__ import annotations

import torch

from fxzip.stats import SpaceObserver, Workspace


def reference(feats: list[torch.Tensor], dim: int, offset: int, size: int) -> torch.Tensor:
    rows = [f.narrow(dim, offset, size).movedim(dim, -1).reshape(-1, size) for f in feats]
    return torch.cat(rows, 1).double()


def test_blocked_gram_matches_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n_models, size = 3, 200  # 2 blocks per model: 6 blocks, 21 block products
    obs = SpaceObserver(n_models, size, Workspace(max_floats=n_models * size * 2 * 5 * 5))  # 2 images per chunk
    assert len(obs._blocks) == 6
    seen = []
    for batch in range(3):
        feats = [torch.relu(torch.randn(7, 210, 5, 5, generator=g)) + 0.5 for _ in range(n_models)]
        if batch == 1:  # channels-last memory and a non-contiguous slice are read alike
            feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        obs(*feats, dim=1, offset=7)
        seen.append(reference(feats, 1, 7, size))
    ref = torch.cat(seen)
    st = obs.stats()
    assert st.count == ref.shape[0]
    torch.testing.assert_close(st.mean, ref.mean(0), rtol=1e-6, atol=1e-6)
    cov = torch.cov(ref.T, correction=0)
    assert float((st.covariance() - cov).abs().max() / cov.diagonal().max()) < 1e-6
    assert torch.equal(st.gram, st.gram.T)  # mirrored exactly
    torch.testing.assert_close(st.correlation(), torch.corrcoef(ref.T), rtol=0, atol=1e-5)
    st2 = obs.stats()  # idempotent
    assert torch.equal(st2.gram, st.gram)


def test_blocked_twins_correlate_exactly_one() -> None:
    g = torch.Generator().manual_seed(1)
    n = 160  # the blocked path (one 80-row block pair per model)
    obs = SpaceObserver(2, n)
    assert len(obs._blocks) > 2
    for _ in range(3):
        x = torch.relu(torch.randn(300, n, generator=g) @ torch.randn(n, n, generator=g))
        obs(x, x.clone(), dim=1, offset=0)
    corr = obs.stats().correlation()
    assert torch.all(corr[:n, n:].diagonal() == 1.0)
    assert torch.all(corr.diagonal() == 1.0)


def test_feature_axis_last_and_single_samples() -> None:
    """Tokens with the channel axis last (LayerNorm-style) and plain (batch, features) rows."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 6, 70, generator=g), torch.randn(4, 6, 70, generator=g)
    obs = SpaceObserver(2, 64)
    obs(a, b, dim=2, offset=3)
    ref = reference([a, b], 2, 3, 64)
    st = obs.stats()
    assert st.count == 24
    torch.testing.assert_close(st.covariance(), torch.cov(ref.T, correction=0), rtol=1e-5, atol=1e-5)
    obs = SpaceObserver(2, 5)
    x, y = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    obs(x, y, dim=1, offset=0)
    torch.testing.assert_close(obs.stats().covariance(), torch.cov(torch.cat([x, y], 1).double().T, correction=0),
                               rtol=1e-5, atol=1e-6)


def test_packed_gram_and_pairwise_correlation_equal_the_full_matrices() -> None:
    """Only the upper blocks are stored; the full matrix, single entries and the
    correlation at pairs (what the report reads) are the full matrix's values
    exactly, constant features included."""
    g = torch.Generator().manual_seed(3)
    n = 150  # 2 blocks per model
    obs = SpaceObserver(2, n)
    for _ in range(2):
        a = torch.relu(torch.randn(40, n, generator=g))
        b = torch.relu(torch.randn(40, n, generator=g))
        a[:, :3] = 0.0  # dead in model 0 ...
        b[:, 5] = 0.0   # ... and in model 1
        obs(a, b, dim=1, offset=0)
    st = obs.stats()
    blocks = len(obs._blocks)  # (blocks + 1) / (2 blocks) of the full matrix: 10 of 16 blocks here
    assert st._gram.flat.numel() == (2 * n) ** 2 * (blocks + 1) // (2 * blocks)
    full = st.gram
    assert torch.equal(full, full.T)
    rows = torch.randint(0, 2 * n, (500,), generator=g)
    cols = torch.randint(0, 2 * n, (500,), generator=g)
    rows[:4], cols[:4] = torch.tensor([0, 1, 0, 155]), torch.tensor([1, 155, 7, 155])  # constants, diagonal
    assert torch.equal(st._gram.entries(rows, cols), full[rows, cols])
    assert torch.equal(st.correlation_at(rows, cols), st.correlation()[rows, cols])
    assert torch.equal(st.variance(), st.covariance().diagonal())


def test_channel_last_features_are_shifted_by_a_transposed_copy_with_the_same_bits() -> None:
    """Token features (batch, tokens, channels) take the transposed-copy path;
    its rows equal the strided subtraction's bit for bit, so twins stay exact."""
    from fxzip.stats import _shifted_rows

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 17, 48, generator=g)
    chunk = feats.movedim(-1, 0).narrow(1, 1, 2)  # channel-major rows of a slice of the batch
    shift = torch.randn(48, generator=g)
    fast = torch.empty(48, 2 * 17)
    _shifted_rows(chunk, shift, fast)
    slow = torch.empty(48, 2 * 17)
    torch.sub(chunk, shift.view(48, 1, 1), out=slow.view(chunk.shape))
    assert torch.equal(fast, slow)
    conv = torch.randn(2, 8, 3, 3, generator=g).movedim(1, 0)  # NCHW: already channel-major rows
    rows = torch.empty(8, 18)
    _shifted_rows(conv, shift[:8], rows)
    assert torch.equal(rows, (conv - shift[:8].view(8, 1, 1, 1)).reshape(8, -1))
