"""Matchers (fxzip.matching) and feature statistics (fxzip.stats) on real feature
matrices whose right answer is known by construction or by brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fxzip.matching import (
    MATCHERS,
    Similarity,
    cluster_assignment,
    constant_groups,
    get_matcher,
    mean_matched_correlation,
    permute,
    separate_rescaled_copies,
    weight_average,
    zipit,
)
from fxzip.stats import SpaceObserver, SpaceStats, constant_classes

# ----------------------------------------------------------------- helpers

def stats_of(*features: torch.Tensor) -> SpaceStats:
    """Statistics of the stacked features [model 0 | model 1 | ...], as in an experiment."""
    Z = torch.cat(features, dim=1).double()
    return SpaceStats(Z.shape[0], Z.sum(0), Z.T @ Z, torch.zeros(Z.shape[1], dtype=torch.float64))


def observed_stats(*features: torch.Tensor, batch: int = 100) -> SpaceStats:
    """The same statistics the way a merge gathers them: float32 batches through a SpaceObserver."""
    n = features[0].shape[1]
    obs = SpaceObserver(len(features), n)
    for chunk in zip(*(f.float().split(batch) for f in features)):
        obs(*chunk, dim=1, offset=0)
    return obs.stats()


def relu_features(samples: int, n: int, seed: int) -> torch.Tensor:
    """Post-ReLU features of a random layer: non-negative, mutually correlated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, n, generator=g, dtype=torch.float64)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.relu(x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))


def merge_matrix(assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M (n x N*n) averaging each cluster and U (N*n x n), the 0/1 assignment."""
    flat = assign.reshape(-1)
    n = int(assign.shape[1])
    U = torch.zeros(flat.numel(), n, dtype=torch.float64)
    U[torch.arange(flat.numel()), flat] = 1.0
    M = U.T / U.sum(0)[:, None]
    return M, U


def clusters_of(assign: torch.Tensor) -> list[list[int]]:
    flat = assign.reshape(-1).tolist()
    return [sorted(i for i, c in enumerate(flat) if c == j) for j in range(assign.shape[1])]


def check_valid(assign: torch.Tensor, n_models: int, size: int) -> None:
    assert assign.shape == (n_models, size)
    assert assign.dtype == torch.long
    assert sorted(set(assign.reshape(-1).tolist())) == list(range(size))


# -------------------------------------------------- permutation recovery

@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_zipit_recovers_permutation(alpha: float, noise: float) -> None:
    n = 12
    x = relu_features(400, n, seed=1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    y = x[:, perm] + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    m = zipit(stats_of(x, y), 2, n, alpha=alpha, beta=0.0)
    check_valid(m.assign, 2, n)
    # feature j of model 1 is feature perm[j] of model 0
    assert torch.equal(m.assign[1], m.assign[0][perm])
    assert m.within == [0, 0] and m.cross == n and not m.budget_relaxed
    # clusters are numbered by model 0's channel order
    assert torch.equal(m.assign[0], torch.arange(n))


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_permute_recovers_permutation(noise: float) -> None:
    n = 12
    x = relu_features(400, n, seed=4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    y = x[:, perm] + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype)
    m = permute(stats_of(x, y), 2, n)
    check_valid(m.assign, 2, n)
    assert torch.equal(m.assign[0], torch.arange(n))
    assert torch.equal(m.assign[1], perm)


@pytest.mark.parametrize("n_models", [3, 4])
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_zipit_many_copies_cluster_one_feature(n_models: int, noise: float) -> None:
    n = 8
    x = relu_features(400, n, seed=7)
    g = torch.Generator().manual_seed(8)
    perms = [torch.arange(n)] + [torch.randperm(n, generator=g) for _ in range(n_models - 1)]
    copies = [x[:, p] + noise * torch.randn(x.shape, generator=g, dtype=x.dtype) for p in perms]
    m = zipit(stats_of(*copies), n_models, n, alpha=1.0, beta=0.0)
    check_valid(m.assign, n_models, n)
    for members in clusters_of(m.assign):
        # every cluster holds exactly one feature of every model, all the same underlying feature
        assert sorted(i // n for i in members) == list(range(n_models))
        assert len({int(perms[i // n][i % n]) for i in members}) == 1
    assert m.within == [0] * n_models and not m.budget_relaxed


# ------------------------------------------------------- assignment shape

@pytest.mark.parametrize("method,kwargs", [("zipit", dict(alpha=0.3, beta=0.125)),
                                           ("zipit", dict(alpha=1.0, beta=1.0)),
                                           ("zipit", dict(alpha=0.0, beta=0.5)),
                                           ("permute", {}), ("weight_average", {})])
@pytest.mark.parametrize("n_models", [2, 3])
def test_assignment_is_a_clustering(method: str, kwargs: dict, n_models: int) -> None:
    if method == "zipit" and kwargs["alpha"] == 0 and n_models > 2:
        pytest.skip("alpha=0 needs two models")
    n = 10
    feats = [relu_features(200, n, seed=10 + k) for k in range(n_models)]
    m = get_matcher(method)(stats_of(*feats), n_models, n, **kwargs)
    check_valid(m.assign, n_models, n)
    M, U = merge_matrix(m.assign)
    sizes = U.sum(0)
    for j in range(n):
        row = M[j]
        assert torch.all((row == 0) | (row == 1.0 / sizes[j]))
        assert float(row.sum()) == pytest.approx(1.0, abs=1e-12)
    assert set(U.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(U.sum(1) == 1)
    # U is the pseudo-inverse of M
    torch.testing.assert_close(U, torch.linalg.pinv(M), rtol=0, atol=1e-10)
    # N*n - n merges; a merge counts once in cross, or at least once in within
    assert sum(m.within) + m.cross >= n * (n_models - 1)
    assert m.cross <= n * (n_models - 1)


def test_cluster_assignment_numbers_by_smallest_member() -> None:
    a = cluster_assignment([[5, 1], [3, 0], [2, 4]], 2, 3)
    assert a.tolist() == [[0, 1, 2], [0, 2, 1]]
    with pytest.raises(AssertionError):
        cluster_assignment([[0, 1], [2, 3]], 2, 3)


# ------------------------------------------------------------ beta budget

def within_pressure(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model 0 holds n/2 features, each twice (within-model correlation 1); model 1
    holds noisy copies of those features and of others, so every cross pair is
    clearly less correlated than model 0's twins."""
    g = torch.Generator().manual_seed(seed)
    base = relu_features(500, n, seed=seed)
    half = base[:, : n // 2]
    a = torch.cat([half, half], 1) + 1e-3 * torch.randn(500, n, generator=g, dtype=torch.float64)
    b = base + 0.7 * base.std(0) * torch.randn(500, n, generator=g, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("beta", [0.0, 0.125, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_beta_budget_is_used_exactly_under_pressure(alpha: float, beta: float) -> None:
    n = 16
    a, b = within_pressure(n, seed=20)
    corr = stats_of(a, b).correlation()
    # the construction: model 0's twins beat every cross pair
    twins = torch.stack([corr[i, i + n // 2] for i in range(n // 2)])
    assert float(twins.min()) > float(corr[:n, n:].max()) + 0.1
    budget = math.floor(beta * (2 - 1) * n / 2)
    m = zipit(stats_of(a, b), 2, n, alpha=alpha, beta=beta)
    check_valid(m.assign, 2, n)
    assert m.within[0] == min(budget, n // 2)
    assert m.within[1] <= budget
    if beta == 0:
        assert m.within == [0, 0]
    assert not m.budget_relaxed


@pytest.mark.parametrize("n_models,alpha,beta", [(2, 0.3, 0.125), (2, 1.0, 0.5), (3, 0.3, 0.25), (3, 1.0, 0.6),
                                                 (4, 0.5, 0.3), (4, 0.3, 1.0)])
def test_beta_budget_never_exceeded(n_models: int, alpha: float, beta: float) -> None:
    n = 9
    budget = math.floor(beta * (n_models - 1) * n / n_models)
    for seed in range(4):
        feats = [relu_features(60, n, seed=100 * seed + k) for k in range(n_models)]
        # duplicate a few columns inside model 0 to create within-model pressure
        feats[0][:, 1] = feats[0][:, 0]
        feats[0][:, 3] = feats[0][:, 2]
        m = zipit(stats_of(*feats), n_models, n, alpha=alpha, beta=beta)
        check_valid(m.assign, n_models, n)
        if not m.budget_relaxed:
            assert all(w <= budget for w in m.within), (seed, m.within, budget)
        # within counts are what the clusters say: per cluster and model, members beyond the first
        expected = [0] * n_models
        for members in clusters_of(m.assign):
            for k in range(n_models):
                expected[k] += max(0, sum(1 for i in members if i // n == k) - 1)
        assert m.within == expected


def test_argument_checks() -> None:
    st = stats_of(relu_features(50, 4, 0), relu_features(50, 4, 1), relu_features(50, 4, 2))
    with pytest.raises(ValueError, match="alpha=0"):
        zipit(st, 3, 4, alpha=0.0, beta=0.0)
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            zipit(st, 3, 4, alpha=alpha, beta=0.0)
    for beta in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            zipit(st, 3, 4, alpha=0.3, beta=beta)
    with pytest.raises(ValueError, match="unknown method 'nope'.*permute"):
        get_matcher("nope")
    assert {"zipit", "permute", "weight_average"} <= set(MATCHERS)


# ------------------------------------------------------ constant features

def test_correlation_of_constant_features() -> None:
    g = torch.Generator().manual_seed(0)
    live = torch.randn(100, 3, generator=g, dtype=torch.float64)
    const = torch.tensor([0.0, 0.0, 2.5, 1e4], dtype=torch.float64).expand(100, 4)
    st = stats_of(live, const)
    corr = st.correlation()
    assert not torch.isnan(corr).any()
    assert st.constant().tolist() == [False] * 3 + [True] * 4
    c = corr[3:, 3:]
    assert c.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert torch.all(corr[:3, 3:] == 0) and torch.all(corr[3:, :3] == 0)
    torch.testing.assert_close(corr[:3, :3], torch.corrcoef(live.T))


@pytest.mark.parametrize("scale", [1e-8, 1e6])
def test_matching_is_scale_invariant(scale: float) -> None:
    """Correlation does not depend on units: a space scaled by any factor (tiny
    post-layer-scale features, large logits) is matched exactly as before."""
    n = 10
    x = relu_features(300, n, seed=34)
    x[:, 3] = 0.0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(35))
    y = x[:, perm] + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(36), dtype=x.dtype)
    base, scaled = stats_of(x, y), stats_of(scale * x, scale * y)
    assert torch.equal(scaled.constant(), base.constant())
    assert int(base.constant().sum()) == 1  # model 0's dead feature (model 1's copy is noisy)
    torch.testing.assert_close(scaled.correlation(), base.correlation(), rtol=0, atol=1e-9)
    for kwargs in (dict(alpha=0.3, beta=0.125), dict(alpha=1.0, beta=0.0)):
        assert torch.equal(zipit(scaled, 2, n, **kwargs).assign, zipit(base, 2, n, **kwargs).assign)
    assert torch.equal(permute(scaled, 2, n).assign, permute(base, 2, n).assign)


def test_rounding_noise_is_constant() -> None:
    """A feature whose spread is float rounding next to O(1) features counts as constant."""
    g = torch.Generator().manual_seed(37)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    x[:, 2] = 1e-9 * torch.randn(200, generator=g, dtype=torch.float64)
    assert stats_of(x).constant().tolist() == [False, False, True, False]


def test_large_offset_feature_is_not_constant() -> None:
    g = torch.Generator().manual_seed(1)
    x = 1e4 + torch.randn(200, 2, generator=g, dtype=torch.float64)
    st = stats_of(x)
    assert not st.constant().any()
    torch.testing.assert_close(st.correlation(), torch.corrcoef(x.T))


def test_identical_features_correlate_exactly_one() -> None:
    """Exact twins must tie exactly with equal constants (correlation 1.0, not 1 - 1ulp),
    or zipit's tie rules cannot make a self-merge the identity."""
    n = 64
    x = relu_features(600, n, seed=31)
    corr = observed_stats(x, x.clone()).correlation()
    assert torch.all(corr[:n, n:].diagonal() == 1.0)
    assert torch.all(corr.diagonal() == 1.0)


DEAD_CASES = [("zipit", dict(alpha=0.3, beta=0.125)), ("zipit", dict(alpha=0.0, beta=0.5)),
              ("zipit", dict(alpha=1.0, beta=1.0)), ("permute", {})]


@pytest.mark.parametrize("method,kwargs", DEAD_CASES)
def test_dead_features_self_match_by_index(method: str, kwargs: dict) -> None:
    n = 10
    x = relu_features(300, n, seed=30)
    x[:, [1, 4, 5, 8]] = 0.0  # dead ReLUs: constant zero, all equal to each other
    m = get_matcher(method)(observed_stats(x, x.clone()), 2, n, **kwargs)
    assert torch.equal(m.assign, torch.arange(n).repeat(2, 1))
    assert m.within == [0, 0]


@pytest.mark.parametrize("method,kwargs", DEAD_CASES)
def test_dead_features_pair_in_channel_order(method: str, kwargs: dict) -> None:
    """Under a permutation, live features follow it and the (indistinguishable) dead
    ones pair in channel order: model 0's first dead with model 1's first dead, ..."""
    n = 10
    x = relu_features(300, n, seed=32)
    dead = [1, 4, 5, 8]
    x[:, dead] = 0.0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(33))
    m = get_matcher(method)(observed_stats(x, x[:, perm]), 2, n, **kwargs)
    pos = torch.argsort(perm)  # feature i of model 0 sits at pos[i] in model 1
    dead_b = sorted(int(pos[i]) for i in dead)
    for i in range(n):
        j = dead_b[dead.index(i)] if i in dead else int(pos[i])
        assert m.assign[1, j] == m.assign[0, i], i


@pytest.mark.parametrize("method,kwargs", DEAD_CASES)
def test_dead_features_pair_by_weight_signature(method: str, kwargs: dict) -> None:
    """With a weight signature the (indistinguishable on the data) dead features
    pair with their true partners under a permutation, not in channel order."""
    n = 10
    x = relu_features(300, n, seed=32)
    dead = [1, 4, 5, 8]
    x[:, dead] = 0.0
    perm = torch.tensor([8, 5, 4, 1, 0, 2, 3, 6, 7, 9])  # reverses the dead features' order
    signature = torch.randn(n, 6, generator=torch.Generator().manual_seed(34))
    sim = Similarity.of(observed_stats(x, x[:, perm]))
    sim.signature = torch.cat([signature, signature[perm]])
    m = get_matcher(method)(sim, 2, n, **kwargs)
    pos = torch.argsort(perm)
    for i in range(n):
        assert m.assign[1, int(pos[i])] == m.assign[0, i], i


def test_all_dead_layer_self_matches_by_index() -> None:
    n = 6
    x = torch.zeros(50, n, dtype=torch.float64)
    for method, kwargs in [("zipit", dict(alpha=0.3, beta=0.5)), ("permute", {})]:
        m = get_matcher(method)(stats_of(x, x), 2, n, **kwargs)
        assert torch.equal(m.assign, torch.arange(n).repeat(2, 1))


# --------------------------------------------- brute force / naive references

def naive_zipit(corr: np.ndarray, n_models: int, size: int, alpha: float, beta: float):
    """ZipIt!'s greedy as its docstring states it, scanning every pair at every step."""
    total = n_models * size
    members = {i: [i] for i in range(total)}
    sim = {(a, b): float(corr[a, b]) for a in range(total) for b in range(total) if a != b}
    budget = math.floor(beta * (n_models - 1) * size / n_models)
    within, cross, relaxed, finished = [0] * n_models, 0, False, []
    while len(members) + len(finished) > size:
        best = None
        for a, b in itertools.combinations(sorted(members), 2):
            overlap = {i // size for i in members[a]} & {i // size for i in members[b]}
            if not relaxed and any(within[k] >= budget for k in overlap):
                continue
            key = (sim[a, b], not overlap, -a, -b)
            if best is None or key > best[0]:
                best = (key, a, b, overlap)
        if best is None:
            assert not relaxed
            relaxed = True
            continue
        _, a, b, overlap = best
        for k in overlap:
            within[k] += 1
        cross += not overlap
        merged = members[a] + members.pop(b)
        if alpha > 0:
            members[a] = merged
            for c in members:
                if c != a:
                    sim[a, c] = sim[c, a] = alpha * min(sim[a, c], sim[b, c])
        else:
            del members[a]
            finished.append(merged)
    clusters = finished + list(members.values())
    return cluster_assignment(clusters, n_models, size), within, cross, relaxed


@pytest.mark.parametrize("seed", range(8))
def test_zipit_greedy_matches_naive_pairs(seed: int) -> None:
    n = 4
    g = torch.Generator().manual_seed(seed)
    st = stats_of(torch.randn(12, n, generator=g, dtype=torch.float64),
                  torch.randn(12, n, generator=g, dtype=torch.float64))
    m = zipit(st, 2, n, alpha=0.0, beta=0.0)
    ref, within, cross, relaxed = naive_zipit(st.correlation().numpy(), 2, n, 0.0, 0.0)
    assert torch.equal(m.assign, ref)
    assert (m.within, m.cross, m.budget_relaxed) == (within, cross, relaxed) == ([0, 0], n, False)


@pytest.mark.parametrize("n_models,alpha,beta", [(2, 0.0, 0.5), (2, 0.3, 0.0), (2, 0.3, 0.25), (2, 1.0, 1.0),
                                                 (3, 0.3, 0.125), (3, 0.5, 0.4), (3, 1.0, 0.0), (4, 0.2, 0.3)])
def test_zipit_greedy_matches_naive_general(n_models: int, alpha: float, beta: float) -> None:
    n, relaxations = 5, 0
    for seed in range(6):
        g = torch.Generator().manual_seed(1000 * seed + n_models)
        # few samples: correlations spread over [-1, 1], negative ones included
        feats = [torch.randn(10, n, generator=g, dtype=torch.float64) for _ in range(n_models)]
        st = stats_of(*feats)
        m = zipit(st, n_models, n, alpha=alpha, beta=beta)
        ref, within, cross, relaxed = naive_zipit(st.correlation().numpy(), n_models, n, alpha, beta)
        assert torch.equal(m.assign, ref), seed
        assert (m.within, m.cross, m.budget_relaxed) == (within, cross, relaxed), seed
        relaxations += relaxed
    if n_models == 3 and beta == 0:
        assert relaxations > 0  # the budget-lifting path is exercised too


def naive_reference_zipit(corr: np.ndarray, size: int, alpha: float, beta: float) -> torch.Tensor:
    """The ZipIt! reference code's loop for two models as that code is written
    (alpha > 0): one dense similarity matrix, the first maximum of it in row-major
    order merges, the merged row is alpha times the minimum of its parents', the
    merged-away column is deleted, a cluster is labelled by its lowest member's
    model, and a model whose within-label budget (checked after each such merge)
    runs out writes -inf between all the clusters it then labels."""
    S = corr.astype(np.float64).copy()
    np.fill_diagonal(S, -np.inf)
    members = [[i] for i in range(2 * size)]
    label = [i // size for i in range(2 * size)]
    budget = [int((size // 2) * beta + 1e-4)] * 2
    while len(members) > size:
        r, c = sorted(divmod(int(np.argmax(S)), S.shape[1]))
        members[r] = members[r] + members.pop(c)
        row = alpha * np.minimum(S[r], S[c])
        S[r, :], S[:, r] = row, row
        S[r, r] = -np.inf
        S = np.delete(np.delete(S, c, 0), c, 1)
        same = label[r] == label.pop(c)
        if same:
            budget[label[r]] -= 1
            if budget[label[r]] <= 0:
                mine = np.array(label) == label[r]
                S[np.ix_(mine, mine)] = -np.inf
    return cluster_assignment(members, 2, size)


def test_zipit_reference_is_the_reference_codes_greedy() -> None:
    """zipit_reference takes every decision the reference code's loop takes
    (budget 0 allowing one merge, sticky -inf, ties to the lowest row) on
    correlations with negative entries; fxzip's own rule differs on some of them,
    so the comparison can tell the two apart."""
    differs = 0
    for size, alpha, beta in [(16, 0.3, 0.125), (16, 1e-4, 0.075), (16, 0.5, 1.0), (12, 0.3, 0.0),
                              (32, 0.3, 0.125), (9, 0.8, 0.4)]:
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            shared = relu_features(3 * size, size, seed)  # the two models' features: related, not copies
            feats = [shared + torch.randn(3 * size, size, generator=g, dtype=torch.float64) for _ in range(2)]
            st = stats_of(*feats)
            ref = naive_reference_zipit(st.correlation().numpy(), size, alpha, beta)
            case = (size, alpha, beta, seed)
            assert torch.equal(get_matcher("zipit_reference")(st, 2, size, alpha=alpha, beta=beta).assign, ref), case
            assert torch.equal(zipit(st, 2, size, alpha=alpha, beta=beta, owner="first").assign, ref), case
            differs += not torch.equal(zipit(st, 2, size, alpha=alpha, beta=beta).assign, ref)
    assert differs > 0


@pytest.mark.parametrize("a0_b0_first", [True, False])
def test_zipit_reference_forbids_by_history(a0_b0_first: bool) -> None:
    """A: features 0-2, B: 3-5, one within-model merge each. B4 and B5 merge
    (0.9), which spends B's budget. {A0, B3} may then take {B4, B5} (0.8) if A0
    and B3 merged before that (the pair was labelled A when B's pairs were
    forbidden), and not if after (B3's forbidden {B4, B5} is inherited).
    fxzip's own rule forbids it either way: the cluster holds a B feature."""
    c = np.full((6, 6), 0.1)
    c[4, 5] = c[5, 4] = 0.9
    c[0, 3] = c[3, 0] = 0.95 if a0_b0_first else 0.85
    for i in (0, 3):
        for j in (4, 5):
            c[i, j] = c[j, i] = 0.8
    c[1, 2] = c[2, 1] = -0.5
    np.fill_diagonal(c, 1.0)
    sim = Similarity(torch.from_numpy(c))
    ref = clusters_of(get_matcher("zipit_reference")(sim, 2, 3, alpha=1.0, beta=1.0).assign)
    assert torch.equal(get_matcher("zipit_reference")(sim, 2, 3, alpha=1.0, beta=1.0).assign,
                       naive_reference_zipit(c, 3, 1.0, 1.0))
    assert ([0, 3, 4, 5] in ref) == a0_b0_first
    assert [0, 3, 4, 5] not in clusters_of(zipit(sim, 2, 3, alpha=1.0, beta=1.0).assign)


@pytest.mark.parametrize("seed", range(5))
def test_permute_is_optimal_assignment(seed: int) -> None:
    n = 5
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(15, n, generator=g, dtype=torch.float64)
    b = a @ torch.randn(n, n, generator=g, dtype=torch.float64) + torch.randn(15, n, generator=g, dtype=torch.float64)
    st = stats_of(a, b)
    corr = st.correlation()
    block = corr[:n, n:]
    best = max(itertools.permutations(range(n)), key=lambda p: sum(float(block[i, p[i]]) for i in range(n)))
    m = permute(st, 2, n)
    # A's feature i is paired with B's feature best[i]
    expected = torch.empty(n, dtype=torch.long)
    expected[list(best)] = torch.arange(n)
    assert torch.equal(m.assign[0], torch.arange(n))
    assert torch.equal(m.assign[1], expected)


def test_permute_many_models_aligns_each_to_model_0() -> None:
    n = 8
    x = relu_features(300, n, seed=40)
    g = torch.Generator().manual_seed(41)
    perms = [torch.randperm(n, generator=g) for _ in range(3)]
    m = permute(stats_of(x, *[x[:, p] for p in perms]), 4, n)
    assert torch.equal(m.assign[0], torch.arange(n))
    for k, p in enumerate(perms, start=1):
        assert torch.equal(m.assign[k], p)


# ------------------------------------------------------ simple matchers

@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_weight_average_is_identity(n_models: int) -> None:
    m = weight_average(None, n_models, 7)
    assert torch.equal(m.assign, torch.arange(7).repeat(n_models, 1))
    assert m.within == [0] * n_models and m.cross == 7 * (n_models - 1)


def test_mean_matched_correlation_by_hand() -> None:
    corr = torch.tensor([[1.0, 0.1, 0.2, 0.8],
                         [0.1, 1.0, 0.6, 0.3],
                         [0.2, 0.6, 1.0, 0.4],
                         [0.8, 0.3, 0.4, 1.0]], dtype=torch.float64)
    # clusters {A0, B1} and {A1, B0}: pairs (0, 3) and (1, 2)
    assign = torch.tensor([[0, 1], [1, 0]])
    assert mean_matched_correlation(corr, assign) == pytest.approx((0.8 + 0.6) / 2)
    # one cluster of three {A0, A1, B1} and a singleton {B0}: pairs (0,1), (0,3), (1,3)
    assign = torch.tensor([[0, 0], [1, 0]])
    assert mean_matched_correlation(corr, assign) == pytest.approx((0.1 + 0.8 + 0.3) / 3)


# ---------------------------------------------------------- statistics

def test_observer_accuracy_with_large_offset() -> None:
    g = torch.Generator().manual_seed(50)
    n, batches = 6, 5
    mix = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
    data = [(1e4 + torch.randn(256, n, generator=g, dtype=torch.float64) @ mix).float() for _ in range(batches)]
    obs = SpaceObserver(2, n // 2)
    for x in data:
        obs(x[:, : n // 2], x[:, n // 2:], dim=1, offset=0)
    st = obs.stats()
    ref = torch.cat(data).double()  # the very float32 values the observer saw
    cov_ref = torch.cov(ref.T, correction=0)
    assert st.count == ref.shape[0]
    torch.testing.assert_close(st.mean, ref.mean(0), rtol=1e-12, atol=0)
    err = (st.covariance() - cov_ref).abs().max() / cov_ref.diagonal().max()
    assert float(err) < 1e-6
    torch.testing.assert_close(st.correlation(), torch.corrcoef(ref.T), rtol=0, atol=1e-6)
    assert not st.constant().any()


def test_observer_pools_pixels_and_probes() -> None:
    """Every pixel is a sample, and the channel slice [offset, offset+size) along dim is read."""
    g = torch.Generator().manual_seed(51)
    a = torch.randn(4, 5, 3, 3, generator=g)
    b = torch.randn(4, 5, 3, 3, generator=g)
    obs = SpaceObserver(2, 3)
    obs(a, b, dim=1, offset=2)
    a2, b2 = torch.randn(2, 5, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    obs(a2, b2, dim=1, offset=2)
    rows = lambda t: t[:, 2:5].permute(0, 2, 3, 1).reshape(-1, 3)
    ref = torch.cat([torch.cat([rows(a), rows(b)], 1), torch.cat([rows(a2), rows(b2)], 1)]).double()
    st = obs.stats()
    assert st.count == 4 * 9 + 2 * 4
    torch.testing.assert_close(st.mean, ref.mean(0))
    torch.testing.assert_close(st.covariance(), torch.cov(ref.T, correction=0), rtol=1e-5, atol=1e-6)


def test_constants_equal_on_the_spaces_scale_are_one_value():
    """A dead GELU unit and its twin in a copy computed in another summation
    order (values from timm's gcvit_xxtiny): both near -1.2e-7, different in
    the third digit, both zero on the scale of a space whose features are
    ~3. They are one constant, so they pair; a constant of another value
    (0.5) does not join them."""
    mean = torch.tensor([0.3, -1.22694e-07, 0.5, 0.3, 0.5, -1.22267e-07], dtype=torch.float64)
    constant = torch.tensor([False, True, True, False, True, True])
    classes = constant_classes(constant, mean, scale=3.29)
    assert classes[1] == classes[5] and classes[2] == classes[4] and classes[1] != classes[2]
    assert (classes[~constant] == -1).all()
    sim = Similarity(torch.eye(6, dtype=torch.float64), constant, mean, classes=classes)
    assert sorted(constant_groups(sim, 2, 3)) == [[1, 5], [2, 4]]


def test_perfect_correlations_prefer_equal_scale():
    """Three features on one ray (x, 2x, 3x) in each of two models: all
    correlate 1. After ``separate_rescaled_copies`` each feature's best
    partner in the other model is its equal-scale twin, and entries below
    1 - eps are untouched."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(500, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(500, 1, generator=g, dtype=torch.float64)
    a = torch.cat([t, 2 * t, 3 * t, noise], 1)
    b = a[:, [2, 0, 3, 1]]  # a permuted copy
    x = torch.cat([a, b], 1)
    corr = torch.corrcoef(x.T)
    before = corr.clone()
    separate_rescaled_copies(corr, x.mean(0), x.std(0))
    best = corr[:4, 4:].argmax(1)
    assert best.tolist() == [1, 3, 0, 2]
    low = before < 1 - 1e-6
    assert torch.equal(corr[low], before[low])
