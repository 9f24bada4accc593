"""Shared fixtures: tiny runs on tiny synthetic data, so the suite fits a 2-core CPU."""

import copy
import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests run next to each other's subprocesses on 2 cores

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = {"dataset": "Synthetic", "synthetic": {"num_classes": 5, "train_size": 320, "test_size": 200, "seed": 0}}
TINY_TRAINING = {"epochs": 3, "batch_size": 32, "lr": 0.05, "milestones": [2], "num_workers": 0,
                 "device": "cpu", "amp": "off"}


def tiny_run(**overrides):
    run = {"kind": "teacher", "model": "ResNet8", "seed": 0, "method": "none",
           "data": copy.deepcopy(TINY_DATA), "training": dict(TINY_TRAINING)}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(run.get(key), dict):
            run[key] = {**run[key], **value}
        else:
            run[key] = value
    return run


def comparable(metrics):
    """metrics.json without what legitimately differs between two runs of the same config."""
    m = copy.deepcopy(metrics)
    for key in ("provenance", "resumed_at_epochs"):
        m.pop(key, None)
    m["history"].pop("epoch_seconds")
    return m


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """A ResNet8 teacher trained for a few epochs on the tiny synthetic task (shared)."""
    from kdlab.train import train
    run_dir = tmp_path_factory.mktemp("teacher")
    metrics = train(tiny_run(training={"epochs": 4, "milestones": [3]}), run_dir)
    return run_dir, metrics
