"""End to end on Synthetic with tiny nets: teacher -> (FT paraphraser) -> every method."""

import pytest
import torch
import torch.nn.functional as F

from kdlab.methods.ft import MissingParaphraser, paraphraser_setting
from kdlab.pretrain import pretrain_paraphraser
from kdlab.train import gradient_share, train

from conftest import tiny_run

CHANCE = 100 / 5  # five classes
MARGIN = 40  # points above chance every distilled student must reach
FT_SETTINGS = {"rate": 0.5, "paraphraser_epochs": 4, "paraphraser_loss": "mse", "paraphraser_lr": 0.01}


@pytest.fixture(scope="module")
def paraphraser(trained_teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "paraphraser.pth"
    run = tiny_run(kind="paraphraser", method="ft", teacher="ResNet8", method_settings=FT_SETTINGS,
                   teacher_weights=str(trained_teacher[0] / "model.pth"))
    pretrain_paraphraser(run, path)
    return path


def student(method, alpha, teacher_dir, **overrides):
    # At alpha 0.95 CE carries 5% of the loss: more, smaller steps than the teacher needed.
    overrides["training"] = {"epochs": 4, "batch_size": 16, "lr": 0.1, "milestones": [3],
                             **overrides.get("training", {})}
    return tiny_run(kind="distill", method=method, alpha=alpha, teacher="ResNet8",
                    teacher_weights=str(teacher_dir / "model.pth"), seed=1, **overrides)


def test_paraphraser_stage_one(paraphraser):
    saved = torch.load(paraphraser, weights_only=True)
    assert saved["settings"]["rate"] == 0.5 and len(saved["reconstruction_loss"]) == 4
    assert saved["reconstruction_loss"][-1] < saved["reconstruction_loss"][0]
    assert paraphraser_setting(saved["settings"]) == "k0.5_mse_4ep_lr0.01"


@pytest.mark.parametrize("alpha", [0.5, 0.95])
@pytest.mark.parametrize("method", ["kd", "fitnets", "rkd", "ft"])
def test_every_method_learns_far_above_chance(method, alpha, trained_teacher, paraphraser, tmp_path):
    teacher_dir, teacher_metrics = trained_teacher
    overrides = {"method_settings": FT_SETTINGS, "paraphraser": str(paraphraser)} if method == "ft" else {}
    metrics = train(student(method, alpha, teacher_dir, **overrides), tmp_path)
    assert metrics["best_acc"] >= CHANCE + MARGIN, metrics["history"]["test_acc"]
    assert metrics["teacher_acc"] == teacher_metrics["last_acc"]
    assert metrics["config"]["training"]["label_smoothing"] == 0.0  # hard labels, whatever the config says
    h = metrics["history"]
    terms = set(h["terms"]) - {"ce"}
    assert terms and all(len(v) == 4 for v in h["terms"].values())
    assert 0 < h["grad_share"][0] < 1 and all(s == 0 for s in h["skipped_steps"])
    assert h["train_loss"][0] == pytest.approx((1 - alpha) * h["terms"]["ce"][0] +
                                               alpha * sum(h["terms"][t][0] for t in terms), rel=1e-6)


def test_the_gradient_share_is_the_method_terms_part_of_the_gradient_norm():
    """Against float64 gradients of each part taken on their own; the share is taken the way the
    step takes it (the method part alone, then one backward of the scaled sum)."""
    torch.manual_seed(0)
    layer, ce_only = torch.nn.Linear(6, 4), torch.nn.Parameter(torch.randn(4))  # no gradient from the method
    x, y, target = torch.randn(9, 6), torch.randint(0, 4, (9,)), torch.randn(9, 4)

    def parts(params, dtype):
        weight, bias, extra = params
        out = torch.tanh(x.to(dtype) @ weight.T + bias)
        return 0.3 * F.cross_entropy(out + extra, y), 0.7 * (out - target.to(dtype)).pow(2).mean()

    params = [layer.weight, layer.bias, ce_only]
    params64 = [p.detach().double().requires_grad_() for p in params]
    norms = []
    for part in parts(params64, torch.float64):
        grads = torch.autograd.grad(part, params64, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item())
    expected = norms[1] / (norms[0] + norms[1])

    ce, method = parts(params, torch.float32)
    scale = 2.0 ** 16  # as the fp16 GradScaler scales both
    method_grads = torch.autograd.grad(scale * method, params, retain_graph=True, allow_unused=True)
    assert method_grads[2] is None
    (scale * (ce + method)).backward()
    assert gradient_share(method_grads, params) == pytest.approx(expected, rel=1e-5)
    assert 0.05 < expected < 0.95  # both parts matter: a swapped or dropped part would fail


# The anchors' additive recipes (RepDistiller's scripts): CE 1 + the published weight; KD 0.1 CE + 0.9 KD.
ADDITIVE = {"kd": ({"ce_weight": 0.1, "kd_weight": 0.9}, {}),
            "fitnets": ({"ce_weight": 1.0, "kd_weight": 0.0}, {"weight": 100.0}),
            "rkd": ({"ce_weight": 1.0, "kd_weight": 0.0}, {"distance_weight": 25.0, "angle_weight": 50.0}),
            "ft": ({"ce_weight": 1.0, "kd_weight": 0.0}, {**FT_SETTINGS, "weight": 200.0, "factor": "channel_mean_sq"})}


@pytest.mark.parametrize("method", list(ADDITIVE))
def test_every_method_learns_in_the_additive_form(method, trained_teacher, paraphraser, tmp_path):
    recipe, settings = ADDITIVE[method]
    overrides = {"paraphraser": str(paraphraser)} if method == "ft" else {}
    run = student(method, None, trained_teacher[0], method_settings=settings,
                  training={"epochs": 3, "milestones": [2]}, **overrides)
    del run["alpha"]
    metrics = train({**run, "additive": recipe}, tmp_path)
    assert metrics["best_acc"] >= CHANCE + MARGIN, metrics["history"]["test_acc"]
    h = metrics["history"]
    assert h["train_loss"][0] == pytest.approx(recipe["ce_weight"] * h["terms"]["ce"][0] +
                                               sum(v[0] for k, v in h["terms"].items() if k != "ce"), rel=1e-6)


def test_rkd_under_fp16_autocast_learns(trained_teacher, tmp_path):
    # fp16 convolution backward is ~100x slower than fp32 on a CPU: the smallest task that learns.
    small = {"synthetic": {"num_classes": 5, "train_size": 96, "test_size": 40, "seed": 0}}
    metrics = train(student("rkd", 0.5, trained_teacher[0], data=small, training={"amp": "fp16"}), tmp_path)
    assert metrics["best_acc"] >= CHANCE + MARGIN, metrics["history"]["test_acc"]
    assert sum(metrics["history"]["skipped_steps"]) <= 2  # at most the scaler's first calibration steps


def test_ft_stage_two_refuses_to_start_without_the_paraphraser(trained_teacher, tmp_path):
    run = student("ft", 0.5, trained_teacher[0], method_settings=FT_SETTINGS,
                  paraphraser=str(tmp_path / "paraphraser.pth"))
    with pytest.raises(MissingParaphraser, match="run stage 1 first"):
        train(run, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_paraphraser_stage_one_resumes_after_an_interruption(trained_teacher, paraphraser, tmp_path,
                                                             monkeypatch, capsys):
    import kdlab.pretrain
    run = tiny_run(kind="paraphraser", method="ft", teacher="ResNet8", method_settings=FT_SETTINGS,
                   teacher_weights=str(trained_teacher[0] / "model.pth"))
    saves, real_save = [], kdlab.pretrain.save_checkpoint

    def dies_after_two_checkpoints(path, obj):
        real_save(path, obj)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # stands in for a kill after epoch 2's checkpoint
    monkeypatch.setattr(kdlab.pretrain, "save_checkpoint", dies_after_two_checkpoints)
    with pytest.raises(KeyboardInterrupt):
        pretrain_paraphraser(run, tmp_path / "paraphraser.pth")
    monkeypatch.setattr(kdlab.pretrain, "save_checkpoint", real_save)
    pretrain_paraphraser(run, tmp_path / "paraphraser.pth")
    assert "resuming the paraphraser from epoch 2" in capsys.readouterr().out
    resumed, reference = (torch.load(p, weights_only=True) for p in (tmp_path / "paraphraser.pth", paraphraser))
    assert resumed["reconstruction_loss"] == reference["reconstruction_loss"]
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in reference["state_dict"].items())
