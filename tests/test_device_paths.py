"""What only a GPU run would show, checked on the CPU: the state a resume loads, and how the device is picked."""

import shutil

import pytest
import torch

import kdlab.train
from kdlab.train import train

from conftest import interrupt_after_checkpoints, tiny_run


def test_a_resume_with_channels_last_switched_continues_the_same_run(tmp_path):
    """channels_last is a runtime key, so a run may resume under the other layout; its momentum buffers
    come back in the checkpoint's. Fused SGD walks weight, gradient and buffer as flat memory: on the
    CPU a buffer of the other layout adds its elements to the wrong weights (CUDA refuses it)."""
    run = tiny_run(training={"epochs": 2, "channels_last": True})
    interrupt_after_checkpoints(kdlab.train, 1, train, run, tmp_path / "same")
    shutil.copytree(tmp_path / "same", tmp_path / "switched")
    for layout, run_dir in ((True, "same"), (False, "switched")):
        train(tiny_run(training={"epochs": 2, "channels_last": layout}), tmp_path / run_dir)
    same, switched = (torch.load(tmp_path / d / "model.pth", weights_only=True) for d in ("same", "switched"))
    # Epoch 2 from one checkpoint in two layouts: float rounding apart (at most 0.6% here; mismatched: 19%).
    differences = {name: ((switched[name] - w).norm() / w.norm()).item() for name, w in same.items()
                   if w.is_floating_point() and w.norm() > 0}
    assert max(differences.values()) <= 2e-2, differences
