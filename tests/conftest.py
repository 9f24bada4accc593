"""Shared fixtures: tiny runs on tiny synthetic data, so the suite fits a 2-core CPU."""

import copy
import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from kdlab.config import method_settings, resolve_run
from kdlab.data import load_dataset
from kdlab.methods import METHODS, ft
from kdlab.methods.base import MethodLoss
from kdlab.runio import atomic_torch_save

torch.set_num_threads(1)  # tests run next to each other's subprocesses on 2 cores

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = {"dataset": "Synthetic", "synthetic": {"num_classes": 5, "train_size": 320, "test_size": 200, "seed": 0}}
TINY_TRAINING = {"epochs": 3, "batch_size": 32, "lr": 0.05, "milestones": [2], "num_workers": 0,
                 "device": "cpu", "amp": "off"}

# Module fixtures that cost most to build (the demo workflow, about 95 s here; the results campaign): every
# test of each on one xdist worker (--dist loadgroup), which builds it once, instead of once per worker.
SHARED_BY_ONE_WORKER = ("demo", "campaign")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in SHARED_BY_ONE_WORKER:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))


def model_outputs(batch, seed, classes, scale=1.0, dtype=torch.float32):
    """Random (stage1, stage2, stage3, embedding, logits) as a CIFAR ResNet returns them (post-ReLU stages)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64,), (classes,)]
    return tuple(((torch.randn(batch, *s, generator=g) * scale).relu() if len(s) == 3 else
                  torch.randn(batch, *s, generator=g) * scale).to(dtype) for s in shapes)


def default_settings(name, **overrides):
    """The method's settings: its defaults, with `overrides` checked by the schema (a misspelt key fails)."""
    return method_settings(name, overrides, f"methods.{name}")


def tiny_run(**overrides):
    run = {"kind": "teacher", "model": "ResNet8", "seed": 0, "method": "none",
           "data": copy.deepcopy(TINY_DATA), "training": dict(TINY_TRAINING)}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(run.get(key), dict):
            run[key] = {**run[key], **value}
        else:
            run[key] = value
    return run


def tiny_student(method, teacher_dir, **overrides):
    """A distilled ResNet8 student of the ResNet8 teacher in teacher_dir (seed 1, two epochs of
    batch 16 at lr 0.1 unless overridden); give it an alpha or an additive recipe."""
    overrides["training"] = {"epochs": 2, "batch_size": 16, "lr": 0.1, "milestones": [1],
                             **overrides.get("training", {})}
    return tiny_run(kind="distill", method=method, teacher="ResNet8", teacher_weights=str(teacher_dir / "model.pth"),
                    seed=1, **overrides)


def every_method_loss(name, tmp_path):
    """Method `name`'s Loss with default settings, for the tiny data (FT gets a fresh paraphraser)."""
    settings = method_settings(name, {}, f"methods.{name}")
    data = resolve_run(tiny_run())["data"]
    paraphraser = tmp_path / "paraphraser.pth"
    atomic_torch_save(paraphraser, {"state_dict": ft.Paraphraser(METHODS["ft"].SETTINGS["rate"]["default"])
                                    .state_dict(), "settings": method_settings("ft", {}, "methods.ft")})
    run = {"data": data, "seed": 0, "paraphraser": str(paraphraser), "train_labels": load_dataset(data).train_y}
    return METHODS[name].Loss(settings, run)


def interrupt_after_checkpoints(module, checkpoints, job, *args):
    """job(*args), stopped by a KeyboardInterrupt (a kill) right after module.save_checkpoint's
    `checkpoints`-th checkpoint; the real save_checkpoint is back afterwards."""
    real_save, saves = module.save_checkpoint, []

    def dies_after_the_checkpoint(path, obj):
        real_save(path, obj)
        saves.append(path)
        if len(saves) == checkpoints:
            raise KeyboardInterrupt
    module.save_checkpoint = dies_after_the_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            job(*args)
    finally:
        module.save_checkpoint = real_save


def comparable(metrics):
    """metrics.json without what legitimately differs between two runs of the same config."""
    m = copy.deepcopy(metrics)
    for key in ("provenance", "resumed_at_epochs", "sha256"):  # a file's checksum covers its provenance too
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


def teacher_with_cache(trained_teacher, directory, run):
    """A copy of the trained teacher's weights in `directory`, its teacher cache for `run` (its
    data and device) beside it."""
    from kdlab.teacher_cache import build, cache_path
    weights = directory / "model.pth"
    shutil.copy(trained_teacher[0] / "model.pth", weights)
    build(run, weights, cache_path(weights), log=lambda message: None)
    return weights


class PoisonLoss(MethodLoss):
    """Method "poison": a term of `size` times the mean squared logit (0: no gradient), NaN on
    the calls (one per training step, counted from 1) that `poisoned(call)` picks."""
    calls, poisoned, size = 0, None, 0.0

    def __init__(self, settings, run):
        super().__init__()

    def terms(self, student_out, teacher_out, labels, index):
        PoisonLoss.calls += 1
        term = PoisonLoss.size * student_out[-1].pow(2).mean()
        return {"poison": term * float("nan") if PoisonLoss.poisoned(PoisonLoss.calls) else term}


@pytest.fixture
def poison_method(monkeypatch):
    """Registers method "poison" (PoisonLoss); call the fixture's value with `poisoned` and `size`."""
    monkeypatch.setitem(METHODS, "poison", types.SimpleNamespace(
        NAME="poison", VERSION=1, NEEDS_TEACHER=False, SETTINGS={}, Loss=PoisonLoss))
    monkeypatch.setattr(PoisonLoss, "calls", 0)

    def set_poison(poisoned, size=0.0):
        monkeypatch.setattr(PoisonLoss, "poisoned", staticmethod(poisoned))
        monkeypatch.setattr(PoisonLoss, "size", size)
    return set_poison
