"""What needs a CUDA GPU: skipped without one (CI never has one). Where the device tool lends
a GPU, run `python -m pytest -q -n 0 tests/test_cuda.py` there (a few minutes, most of it
torch.compile's)."""
import sys
import warnings

import pytest
import torch

from conftest import interrupt_after_checkpoints, teacher_with_cache, tiny_run, tiny_student
from kdlab.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CHANCE, MARGIN = 100 / 5, 40
GPU = {"device": "cuda"}


@pytest.fixture(scope="module")
def cached_teacher(trained_teacher, tmp_path_factory):
    """The CPU-trained teacher's weights with its cache, built on the GPU, beside them."""
    return teacher_with_cache(trained_teacher, tmp_path_factory.mktemp("gpu_teacher"), tiny_run(training=GPU))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_kd_from_the_cache_learns_on_the_gpu(cached_teacher, tmp_path, amp):
    run = tiny_student("kd", cached_teacher.parent, alpha=0.5, training={**GPU, "amp": amp, "epochs": 3,
                                                                         "milestones": [2]})
    metrics = train(run, tmp_path)
    assert metrics["provenance"]["teacher_outputs"] == "cache"
    assert metrics["best_acc"] >= CHANCE + MARGIN, metrics["history"]["test_acc"]
    assert sum(metrics["history"]["skipped_steps"]) <= 2  # at most the fp16 scaler's calibration
    # Weights written on the GPU are CPU tensors: a plain torch.load works without one.
    weights = torch.load(tmp_path / "model.pth", map_location=None, weights_only=True)
    assert all(t.device.type == "cpu" for t in weights.values())


def test_a_cpu_checkpoint_resumes_on_the_gpu_in_the_other_layout(trained_teacher, tmp_path):
    def run(**training):
        return tiny_student("crd", trained_teacher[0], alpha=0.5, training={"epochs": 3, "milestones": [2],
                                                                            **training})
    cpu = train(run(channels_last=False), tmp_path / "cpu")
    interrupt_after_checkpoints(sys.modules["kdlab.train"], 1, train, run(channels_last=False), tmp_path / "moved")
    moved = train(run(**GPU, channels_last=True), tmp_path / "moved")
    assert moved["resumed_at_epochs"] == [1]
    assert moved["provenance"]["resumes"][0]["device"] == torch.cuda.get_device_name()  # the start's was "cpu"
    # Another device draws other CRD negatives and rounds otherwise: the same run within seed noise.
    assert moved["best_acc"] >= CHANCE + MARGIN, moved["history"]["test_acc"]
    assert abs(moved["last_acc"] - cpu["last_acc"]) <= 15, (moved["history"]["test_acc"], cpu["history"]["test_acc"])


def test_the_step_loop_does_not_synchronise_with_the_host(trained_teacher, tmp_path, monkeypatch):
    """Issue 11's promise: the figures of the steps are read once per SYNC_EVERY steps. Made
    larger than an epoch here, an epoch of twice the steps must synchronise as often."""
    monkeypatch.setitem(sys.modules["kdlab.train"].SYNC_EVERY, "cuda", 10**6)

    def synchronisations(train_size, name):
        data = {"synthetic": {"num_classes": 5, "train_size": train_size, "test_size": 64, "seed": 0}}
        run = tiny_student("kd", trained_teacher[0], alpha=0.5, data=data,
                           training={**GPU, "amp": "bf16", "epochs": 1, "batch_size": 16, "teacher_cache": False})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(run, tmp_path / name)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    synchronisations(128, "warm-up")  # cuDNN and the allocator's first calls
    assert synchronisations(256, "16 steps") == synchronisations(128, "8 steps")


def test_compile_on_the_gpu_learns_and_resumes(trained_teacher, tmp_path):
    run = tiny_student("kd", trained_teacher[0], alpha=0.5, training={**GPU, "amp": "bf16", "compile": True,
                                                                      "epochs": 3, "milestones": [2]})
    interrupt_after_checkpoints(sys.modules["kdlab.train"], 1, train, run, tmp_path)
    metrics = train(run, tmp_path)
    assert metrics["resumed_at_epochs"] == [1]
    assert metrics["best_acc"] >= CHANCE + MARGIN, metrics["history"]["test_acc"]
