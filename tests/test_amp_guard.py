"""Mixed precision: each method's loss under autocast against float64, and the health guard's
messages for what autocast and the fp16 GradScaler can hide (a poisoned BatchNorm statistic,
a method term that overwhelms CE)."""

import copy
import json

import pytest
import torch

import kdlab.guard
import kdlab.train
from kdlab.config import method_settings
from kdlab.methods import METHODS, crd
from kdlab.guard import GuardError
from kdlab.train import train

from conftest import every_method_loss, tiny_run

BATCH, CLASSES, TRAIN_SIZE = 64, 100, 50000  # CIFAR-100's shapes


def trained_looking_outputs(seed, feature_scale, labels):
    """Post-ReLU stage outputs with large values (up to ~5 * feature_scale), their pooled
    embedding, and logits where the label wins by a wide margin (max ~50: saturated at T = 4)."""
    g = torch.Generator().manual_seed(seed)
    stages = [(torch.randn(BATCH, c, s, s, generator=g, dtype=torch.float64) * feature_scale).relu()
              for c, s in ((16, 32), (32, 16), (64, 8))]
    logits = torch.randn(BATCH, CLASSES, generator=g, dtype=torch.float64) * 10
    logits[torch.arange(BATCH), labels] += 40
    return [*stages, stages[2].mean((2, 3)), logits]


def terms_and_gradients(loss_fn, student, teacher, labels, index, dtype, scale):
    """The terms as float, and the gradient on the student's outputs (of the total times `scale`,
    as the fp16 GradScaler multiplies it, then divided back) as float64."""
    loss_fn = copy.deepcopy(loss_fn)  # CRD's banks move every call
    student = [x.to(dtype).detach().requires_grad_() for x in student]
    low = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast("cpu", dtype=dtype if low else torch.bfloat16, enabled=low):
        terms = loss_fn(tuple(student), tuple(x.to(dtype) for x in teacher), labels, index)
    (scale * sum(terms.values())).backward()  # outside autocast, as in the training step
    return ({k: v.item() for k, v in terms.items()},
            [None if x.grad is None else x.grad.double() / scale for x in student])


@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"])
def test_every_method_loss_runs_in_float32_under_autocast(name, tmp_path):
    """Under bf16 and fp16 autocast every term and its gradient equal the float64 computation on
    the same (rounded) inputs: nothing is computed in low precision (softmax at T, RKD's distances,
    the normalisations, NST's and CC's kernels, VID's log variance, CRD's exp, DIST's Pearson),
    nothing overflows fp16 (features near 1500: squares far beyond 65504) or underflows."""
    torch.manual_seed(0)
    labels = torch.randint(0, CLASSES, (BATCH,))
    index = torch.randperm(TRAIN_SIZE // CLASSES)[:BATCH] * CLASSES + labels  # each index's class is its label
    if name == "crd":
        loss_fn = crd.Loss(method_settings("crd", {}, "methods.crd"),
                           {"seed": 0, "train_labels": torch.arange(TRAIN_SIZE) % CLASSES})
    else:
        loss_fn = every_method_loss(name, tmp_path)
    student, teacher = trained_looking_outputs(1, 300.0, labels), trained_looking_outputs(2, 450.0, labels)
    # PKT's value is a KL divergence of two near-uniform distributions: float32's rounding of the
    # log-probabilities alone moves it by ~2e-3 relative (its gradient is exact to ~3e-5).
    rtol = 5e-3 if name == "pkt" else 1e-4
    for dtype, scale in ((torch.bfloat16, 1.0), (torch.float16, 2.0 ** 16)):
        rounded = [[x.to(dtype).double() for x in outputs] for outputs in (student, teacher)]
        reference, reference_grads = terms_and_gradients(loss_fn.double(), *rounded, labels, index, torch.float64, 1.0)
        terms, grads = terms_and_gradients(loss_fn.float(), student, teacher, labels, index, dtype, scale)
        for key, value in terms.items():
            assert abs(value - reference[key]) <= rtol * abs(reference[key]), (dtype, key, value, reference[key])
        compared = [(g, r) for g, r in zip(grads, reference_grads) if r is not None]
        assert compared
        for g, r in compared:  # the gradient itself is rounded to the input's dtype: 2^-9 for bf16
            assert (g - r).norm() <= 1e-2 * r.norm(), (dtype, ((g - r).norm() / r.norm()).item())


def test_a_guard_stop_shows_the_gradient_share_and_the_steps_terms(trained_teacher, tmp_path, poison_method):
    """A run stopped inside its first epoch has no log line and no history entry: the message itself
    must show that the method's term overwhelmed CE, and the values of the step that failed."""
    poison_method(lambda call: call >= 3, size=1e6)  # a finite term 1e6 times CE's size, then NaN
    run = tiny_run(kind="distill", method="poison", alpha=0.5, teacher="ResNet8",
                   teacher_weights=str(trained_teacher[0] / "model.pth"),
                   data={"synthetic": {"num_classes": 5, "train_size": 64, "test_size": 8, "seed": 0}},
                   training={"epochs": 2, "batch_size": 16})
    with pytest.raises(GuardError, match=r"epoch 1, step 3: loss term 'poison' went non-finite; amp is 'off', so there "
                                         r"is no GradScaler to skip the step \(that step's loss terms: ce [-+0-9.e]+, "
                                         r"poison nan\)\. At this epoch's first step the poison loss sent 100% of the "
                                         r"gradient \(the rest: CE\)\. The last good checkpoint is kept\."):
        train(run, tmp_path)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["status"] == "failed" and progress["epochs_done"] == 0
    assert "100% of the gradient" in progress["error"]


def test_a_skipped_fp16_step_of_a_nan_forward_stops_at_the_epoch_end_naming_batchnorm(tmp_path, monkeypatch):
    """A NaN input batch under fp16: the GradScaler skips the step, so no weight moves, but the
    forward already put NaN into BatchNorm's running statistics, which every later evaluation
    uses: the run must stop before the checkpoint, saying that, not blame the optimizer step."""
    real_build, real_normalize = kdlab.train.build_model, kdlab.train.Normalize.__call__
    seen = {"model": None, "train_batches": 0, "before": None, "after": None}

    def build(name, classes):
        seen["model"] = real_build(name, classes)
        return seen["model"]

    def normalize(self, images):
        x = real_normalize(self, images)
        if len(images) != 8:  # evaluation batches (20 test images)
            return x
        seen["train_batches"] += 1
        weights = {k: v.detach().clone() for k, v in seen["model"].named_parameters()}
        if seen["train_batches"] == 3:  # epoch 2, step 1
            seen["before"], x = weights, x.clone().index_fill_(0, torch.tensor([0]), float("nan"))
        if seen["train_batches"] == 4:
            seen["after"] = weights
        return x
    monkeypatch.setattr(kdlab.train, "build_model", build)
    monkeypatch.setattr(kdlab.train.Normalize, "__call__", normalize)
    run = tiny_run(data={"synthetic": {"num_classes": 5, "train_size": 16, "test_size": 20, "seed": 0}},
                   training={"amp": "fp16", "epochs": 3, "batch_size": 8, "milestones": [2]})
    with pytest.raises(GuardError, match=r"epoch 2: [0-9]+ buffer\(s\) went non-finite \(stem\.1\.running_mean, "
                                         r"stem\.1\.running_var, .*\) while every weight is finite: a training forward "
                                         r"pass updates them \(BatchNorm's running statistics\) even when the "
                                         r"GradScaler skips its step"):
        train(run, tmp_path)
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])  # the step was skipped
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["status"] == "failed" and progress["history"]["skipped_steps"] == [0, 1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_a_loss_sum_that_overflows_from_finite_terms_stops_the_run_without_a_scaler():
    """Two finite terms can sum to inf (with a finite gradient norm): the fused SGD skips that
    step on the device (found_inf), so the guard must stop the run rather than not count it."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tally = kdlab.guard.StepTally(scaler, "off", 5, {"consecutive_skipped": 0})
    finite = [1.0, 2.0, 3.0, 30.0, 1.0, 1.0]
    overflowed = [2e38, 2e38, float("inf"), 40.0, 1.0, 1.0]  # ce, kd, loss, correct, grad norm, scale
    step, message = tally.read(["ce", "kd"], [finite, overflowed], [64, 64], 10)
    assert step == 11
    assert "weighted sum of the loss terms overflowed" in message and "ce 2e+38" in message
    assert tally.seen == 64 and tally.sums["loss"] == 3.0 * 64  # the good step counted, the bad one not
