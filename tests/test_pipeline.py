"""The merge as ordered stages over one state (fxzip.pipeline, fxzip.stages).

The pipeline's order is data: these tests check that a misordered pipeline is
refused when it is built, that a stage whose inputs are missing says which,
and that merge and calibrate run the stages their options ask for (the report's
timings name exactly those stages' timers).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import batches, prepared

import fxzip
from fxzip.options import MergeOptions
from fxzip.pipeline import Stage, StageOrderError, StageResult, check_order, run_stages
from fxzip.stages import CALIBRATE_STAGES, MERGE_STAGES, MergeState
from fxzip.zoo import resnet20

pytestmark = pytest.mark.usefixtures("one_thread")


class _Reads(Stage):
    name, reads, writes = "reads_matches", ("matches",), ()

    def call(self, graph_module, state):
        return StageResult(graph_module)


class _Writes(Stage):
    name, writes = "writes_matches", ("matches",)

    def call(self, graph_module, state):
        state.matches = {}
        return StageResult(graph_module, {"written": True})


def test_a_stage_reading_what_no_earlier_stage_writes_is_refused_when_the_pipeline_is_built():
    check_order([_Writes(), _Reads()])
    with pytest.raises(StageOrderError, match="reads_matches.*reads \\['matches'\\]"):
        check_order([_Reads(), _Writes()])


def test_every_stage_of_merge_and_calibrate_reads_only_what_an_earlier_stage_writes():
    check_order(MERGE_STAGES)
    check_order(CALIBRATE_STAGES)
    names = [s.name for s in MERGE_STAGES]
    # the order the method needs: refit before the split and the repair, the norm reset after both
    assert names.index("fold") < names.index("refit") < names.index("split") < names.index("repair") \
        < names.index("reset") < names.index("report")
    assert names.index("widths") < names.index("calibrate"), "a bad merged_width must fail before the data pass"


def test_a_stage_run_without_its_inputs_names_them_and_measurements_reach_the_details():
    state = MergeState(originals=[], options=MergeOptions())
    with pytest.raises(StageOrderError, match="needs \\['matches'\\]"):
        _Reads()(state)
    run_stages([_Writes(), _Reads()], state)
    assert state.details == {"written": True}


def _pair():
    data = batches((8, 3, 32, 32), 2)
    return [prepared(resnet20(width=1, out_dim=10), data, seed=s) for s in (0, 1)], data


def test_merge_runs_the_stages_its_options_ask_for():
    (a, b), data = _pair()
    plain = fxzip.merge(a, b, data=data, progress=False).meta["fxzip"]
    assert set(plain.seconds) == {"trace", "analysis", "calibration", "matching", "folding", "reset", "total"}
    refit = fxzip.merge(a, b, data=data, refit=True, progress=False).meta["fxzip"]
    assert {"refit"} <= set(refit.seconds) and "refit" in refit.details
    free = fxzip.merge(a, b, data=None, method="weight_average", example_inputs=data[0], progress=False)
    assert "calibration" not in free.meta["fxzip"].seconds and "reset" not in free.meta["fxzip"].seconds


def test_calibrate_is_the_first_stages_of_merge_and_a_reused_calibration_gives_the_same_merge():
    (a, b), data = _pair()
    cal = fxzip.calibrate(a, b, data=data, progress=False)
    assert set(cal.seconds) == {"trace", "analysis", "calibration"} and cal.stats
    direct = fxzip.merge(a, b, data=data, progress=False)
    reused = fxzip.merge(a, b, data=cal, progress=False)
    for (name, x), (_, y) in zip(direct.state_dict().items(), reused.state_dict().items()):
        assert torch.equal(x, y), name


def test_a_warning_from_inside_the_pipeline_points_at_the_callers_line():
    (a, b), data = _pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxzip.merge(a, b, data=data, stop_at=7, repair=True, progress=False)
    repair = [w for w in caught if "repair applies to full zips only" in str(w.message)]
    assert repair and repair[0].filename == __file__


def test_max_memory_bounds_the_refit_and_repair_cache_without_changing_the_result():
    (a, b), data = _pair()
    free = fxzip.merge(a, b, data=data, refit=True, repair=True, progress=False)
    bounded = fxzip.merge(a, b, data=data, refit=True, repair=True, max_memory=0, progress=False)
    for (name, x), (_, y) in zip(free.state_dict().items(), bounded.state_dict().items()):
        assert torch.equal(x, y), name
    memory = bounded.meta["fxzip"].details["refit"]["memory"]
    assert memory["max_memory"] == 0 and memory["spilled_bytes"] > 0
    assert free.meta["fxzip"].details["refit"]["memory"]["spilled_bytes"] == 0
    with pytest.raises(ValueError, match="max_memory must be a number of bytes"):
        fxzip.merge(a, b, data=data, refit=True, max_memory=-1, progress=False)
