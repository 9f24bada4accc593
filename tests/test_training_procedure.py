"""The training procedure against the authors' code, beyond the loss values (test_authors_code.py):
the learning-rate schedule of RepDistiller and mdistiller, and what the optimizer trains for each
method. RepDistiller's train_student.py builds one SGD over `trainable_list`: the student plus, for
hint its ConvReg, for crd and correlation the two embeddings, for vid the VIDLoss modules (regressors
and log_scale), for factor the translator; the teacher and FT's paraphraser are left out, and
helper/loops.py puts every other module in train mode (the paraphraser in eval). FT's stage 1
(helper/pretrain.py, the authors' train_Paraphraser.py) is an SGD of momentum 0.9 over the
paraphraser alone at its own lr and the run's weight decay."""

import numpy as np
import pytest
import torch

from kdlab.config import method_settings, resolve_run
from kdlab.data import load_dataset
from kdlab.loss import build_loss
from kdlab.methods import ft
from kdlab.models import build_model
from kdlab.pretrain import pretrain_paraphraser
from kdlab.runio import atomic_torch_save
from kdlab.train import lr_at, train

from conftest import tiny_run, tiny_student

SMALL = {"synthetic": {"num_classes": 5, "train_size": 64, "test_size": 16, "seed": 0}}
BATCH = 16
# The modules of each method's loss that RepDistiller's trainable_list holds beside the student.
ANCHOR_TRAINABLE = {"fitnets": ["connector"], "ft": ["translator"], "vid": ["vid"], "cc": ["embed_s", "embed_t"],
                    "crd": ["embed_s", "embed_t"], "at": []}


def test_lr_schedule_is_repdistillers_and_mdistillers():
    """helper/util.py adjust_learning_rate (mdistiller's is the same), called with 1-based epochs:
    lr * rate ** sum(epoch > milestones). Ours takes 0-based epochs: exactly the same values."""
    for lr, rate, milestones, epochs in ((0.05, 0.1, [150, 180, 210], 240), (0.1, 0.2, [2, 5], 8)):
        tr = {"schedule": "multistep", "lr": lr, "lr_decay": rate, "milestones": milestones, "epochs": epochs}
        for epoch in range(1, epochs + 1):
            steps = int(np.sum(epoch > np.asarray(milestones)))
            assert lr_at(epoch - 1, tr) == (lr * rate ** steps if steps > 0 else lr), (epoch, milestones)


@pytest.fixture(scope="module")
def teacher_and_paraphraser(tmp_path_factory):
    directory = tmp_path_factory.mktemp("procedure")
    torch.manual_seed(0)
    torch.save(build_model("ResNet8", 5).state_dict(), directory / "model.pth")
    settings = method_settings("ft", {"translator_bn": True}, "methods.ft")
    atomic_torch_save(directory / "paraphraser.pth", {"state_dict": ft.Paraphraser(settings["rate"]).state_dict(),
                                                      "settings": settings})
    return directory


@pytest.mark.parametrize("method", list(ANCHOR_TRAINABLE))
def test_the_optimizer_trains_the_student_and_the_anchors_trainable_modules(method, teacher_and_paraphraser,
                                                                            tmp_path):
    directory = teacher_and_paraphraser
    extra = {"paraphraser": str(directory / "paraphraser.pth")} if method == "ft" else {}
    settings = method_settings(method, {"translator_bn": True} if method == "ft" else {}, f"methods.{method}")
    run = tiny_student(method, directory, alpha=0.5, method_settings=settings, data=SMALL,
                       training={"epochs": 1, "batch_size": BATCH}, **extra)
    train(run, tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)

    (group,) = checkpoint["optimizer"]["param_groups"]  # one group: the same lr, momentum and decay for all
    assert (group["lr"], group["momentum"], group["weight_decay"], group["dampening"], group["nesterov"]) == \
        (0.1, 0.9, 5e-4, 0, False)
    resolved = resolve_run(run)
    loss = build_loss(resolved, load_dataset(resolved["data"]).train_y)
    expected = [p.shape for p in build_model("ResNet8", 5).parameters()] + \
        [p.shape for name in ANCHOR_TRAINABLE[method] for p in getattr(loss, name).parameters()]
    state = checkpoint["optimizer"]["state"]
    assert [state[i]["momentum_buffer"].shape for i in group["params"]] == expected

    steps = 64 // BATCH  # the auxiliary BatchNorms (FitNets' connector, RepDistiller's translator) trained in
    tracked = {k: int(v) for k, v in checkpoint["method"].items() if k.endswith("num_batches_tracked")}
    assert tracked == ({} if method not in ("fitnets", "ft") else dict.fromkeys(tracked, steps)) and \
        (method not in ("fitnets", "ft") or tracked)
    if method == "crd":  # every sample's row of both banks was updated in the epoch (renormalised to 1;
        # the initial rows are uniform in +-sqrt(3 / dim), of norm 1 only on average) and Z was estimated
        method_state = checkpoint["method"]
        for bank in ("memory_s", "memory_t"):
            assert (method_state[bank].norm(dim=1) - 1).abs().max() < 1e-5
        assert (method_state["z"] > 0).all()
    if method == "ft":  # frozen and out of the optimizer: not even weight decay moves it
        saved = torch.load(directory / "paraphraser.pth", weights_only=True)["state_dict"]
        assert all(torch.equal(checkpoint["method"][f"paraphraser.{k}"], v) for k, v in saved.items())


def test_paraphraser_stage_one_is_sgd_over_the_paraphraser_alone(teacher_and_paraphraser, tmp_path):
    settings = {"rate": 0.5, "paraphraser_loss": "l1", "paraphraser_epochs": 2, "paraphraser_lr": 0.1}
    run = tiny_run(kind="paraphraser", method="ft", teacher="ResNet8", method_settings=settings, data=SMALL,
                   teacher_weights=str(teacher_and_paraphraser / "model.pth"),
                   training={"batch_size": BATCH, "weight_decay": 1e-3})
    pretrain_paraphraser(run, tmp_path / "paraphraser.pth")
    checkpoint = torch.load(tmp_path / "paraphraser.checkpoint.pth", weights_only=True)
    (group,) = checkpoint["optimizer"]["param_groups"]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-3, False)
    shapes = [p.shape for p in ft.Paraphraser(0.5).parameters()]
    assert [checkpoint["optimizer"]["state"][i]["momentum_buffer"].shape for i in group["params"]] == shapes
