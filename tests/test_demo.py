"""The demo's table and verdict: several pairs, a winner only beyond the spread."""
from __future__ import annotations

from fxzip.cli import demo
from fxzip.evaluate import EvalResult


def _pair(zipit: float, permute: float) -> demo.PairResult:
    rows = {name: (1, EvalResult(joint, [joint, joint])) for name, joint in
            [("Permute", permute), ("ZipIt", zipit)]}
    return demo.PairResult(rows, {})


def test_verdict_calls_a_winner_only_beyond_the_pair_to_pair_spread():
    noisy = [_pair(0.70, 0.65), _pair(0.60, 0.66), _pair(0.72, 0.70)]
    assert "a tie" in demo.verdict(noisy, "ZipIt", "Permute")
    clear = [_pair(0.80, 0.65), _pair(0.78, 0.66), _pair(0.82, 0.70)]
    assert demo.verdict(clear, "ZipIt", "Permute").endswith("ZipIt is better")
    assert "cannot tell" in demo.verdict(clear[:1], "ZipIt", "Permute")


def test_demo_runs_several_pairs_and_chooses_alpha_beta_on_held_out_digits(capsys):
    results = demo.run(epochs=2, pairs=2, width=8)
    assert len(results) == 2
    for r in results:
        assert list(r.rows) == ["Model A", "Model B", "W.Avg", "Permute", "ZipIt", "Ensemble"]
        assert set(r.grid) == set(demo.GRID)
    out = capsys.readouterr().out
    assert "held-out" in out and "mean ± std over pairs" in out and "ZipIt vs Permute" in out
    plain, held = demo.load_digits(), demo.load_digits(val_fraction=0.2)
    assert len(held.y_val) > 0 and len(held.y_train) + len(held.y_val) == len(plain.y_train)
    assert (held.y_test == plain.y_test).all()  # the test digits never change
