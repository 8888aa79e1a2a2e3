"""One real experiment: two CNNs trained on disjoint halves of the 8x8 digits
(0-4 vs 5-9) are merged; the merged model must know both tasks."""
from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, TensorDataset

import fxzip
from fxzip.cli import demo
from fxzip.evaluate import evaluate


@pytest.fixture(scope="module")
def trained():
    data = demo.load_digits()
    a, b = demo.train_pair(data, seed=0, epochs=15)
    calib = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=128)
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=256)
    return a, b, calib, test


def test_each_model_knows_only_its_task(trained):
    a, b, _, test = trained
    ra, rb = evaluate(a, test, demo.TASKS), evaluate(b, test, demo.TASKS)
    assert ra.per_task[0] > 0.95 and rb.per_task[1] > 0.95


def test_zipit_knows_both_tasks_and_beats_weight_averaging(trained):
    a, b, calib, test = trained
    zipped = evaluate(fxzip.merge(a, b, data=calib, method="zipit", progress=False), test, demo.TASKS)
    averaged = evaluate(fxzip.merge(a, b, data=calib, method="weight_average", progress=False), test, demo.TASKS)
    assert min(zipped.per_task) > 0.6, zipped  # chance is 0.2 per task
    assert zipped.avg > averaged.avg + 0.1, (zipped, averaged)
    assert zipped.joint > averaged.joint
