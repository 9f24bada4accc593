"""What only a GPU run would show, checked on the CPU: the state a resume loads, and how the device is picked."""

import json
import re
import shutil

import pytest
import torch

import kdlab.train
from kdlab.cli import main as kdlab_main
from kdlab.train import pick_device, train

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_auto_does_not_fall_back_to_the_cpu_in_a_job_given_a_gpu_that_torch_cannot_use(tmp_path, monkeypatch, capsys):
    """A GPU job whose torch cannot use CUDA (a driver older than torch's CUDA build) would train
    on the CPU, tens of times slower, until its walltime: it stops, with torch's reason."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    run = tiny_run(training={"device": "auto"})
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 2
    assert re.search(r"config key 'training\.device': 'auto', and this job was given GPU\(s\) "
                     r"\(CUDA_VISIBLE_DEVICES=0\), but torch \S+ cannot use CUDA \(.+\); fix that, or set it to 'cpu'",
                     capsys.readouterr().err)
    for no_gpu in ("", "-1"):  # a job given none
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", no_gpu)
        assert pick_device("auto") == torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pick_device("auto") == torch.device("cpu")
