"""The additive form reproduces the anchors' update exactly: two SGD steps (momentum,
weight decay) of kdlab's training against the same steps written out by hand."""

import torch
import torch.nn.functional as F

from kdlab.config import resolve_run
from kdlab.data import load_dataset, make_loaders
from kdlab.methods import fitnets
from kdlab.models import build_model
from kdlab.train import Normalize, seed_everything, train

from conftest import tiny_run

LR, MOMENTUM, WEIGHT_DECAY, T = 0.1, 0.9, 5e-4, 4.0
CE_WEIGHT, KD_WEIGHT, HINT_WEIGHT = 1.0, 0.5, 100.0


def additive_run(teacher_weights):
    return tiny_run(kind="distill", method="fitnets", teacher="ResNet8", teacher_weights=str(teacher_weights), seed=2,
                    data={"synthetic": {"num_classes": 5, "train_size": 32, "test_size": 8, "seed": 0}},
                    training={"epochs": 1, "batch_size": 16, "lr": LR, "momentum": MOMENTUM,
                              "weight_decay": WEIGHT_DECAY, "milestones": [5],
                              "channels_last": False},  # the reference runs NCHW: same rounding
                    method_settings={"guided_layer": 0, "hint_layer": 1, "weight": HINT_WEIGHT},
                    additive={"ce_weight": CE_WEIGHT, "kd_weight": KD_WEIGHT, "kd_temperature": T})


def reference_steps(run):
    """ce_weight * CE + kd_weight * KD + weight * hint MSE, and SGD written out, for every batch."""
    run = resolve_run(run)
    seed_everything(run["seed"], True)  # the initialisation order of train(): data, student, method
    arrays = load_dataset(run["data"])
    loader, _ = make_loaders(arrays, 16, 0, run["seed"], False)
    student = build_model("ResNet8", 5).train()
    connector = fitnets.Loss(run["method_settings"], run).connector.train()
    teacher = build_model("ResNet8", 5)
    teacher.load_state_dict(torch.load(run["teacher_weights"], weights_only=True))
    teacher.eval()
    normalize = Normalize(arrays.mean, arrays.std, "cpu")
    params = [*student.parameters(), *connector.parameters()]
    start = [p.detach().clone() for p in params]
    velocity = [None] * len(params)
    loader.sampler.epoch = 0
    for images, labels, _ in loader:
        x = normalize(images)
        s, t = student(x), teacher(x)
        ce = F.cross_entropy(s[-1], labels)
        p_t = torch.softmax(t[-1] / T, dim=1)
        kd = T * T * (p_t * (torch.log(p_t) - torch.log_softmax(s[-1] / T, dim=1))).sum() / len(x)
        hint = ((connector(s[0]) - t[1]) ** 2).mean()
        loss = CE_WEIGHT * ce + KD_WEIGHT * kd + HINT_WEIGHT * hint
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                step = g + WEIGHT_DECAY * p
                velocity[i] = step if velocity[i] is None else MOMENTUM * velocity[i] + step
                p -= LR * velocity[i]
    return student, connector, start


def test_additive_form_takes_the_reference_sgd_steps(tmp_path):
    torch.manual_seed(0)
    torch.save(build_model("ResNet8", 5).state_dict(), tmp_path / "teacher.pth")
    run = additive_run(tmp_path / "teacher.pth")
    train(run, tmp_path / "run")
    trained = torch.load(tmp_path / "run" / "model.pth", weights_only=True)
    method_state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["method"]
    student, connector, start = reference_steps(run)
    expected = {**{k: v for k, v in student.named_parameters()},
                **{f"method.connector.{k}": v for k, v in connector.named_parameters()}}
    got = {**{k: trained[k] for k in dict(student.named_parameters())},
           **{k: method_state[k] for k in expected if k.startswith("method.")}}
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(expected.values(), start))
    worst = max((got[k] - v.detach()).abs().max().item() for k, v in expected.items())
    assert moved > 0.1 and worst < 1e-5, (moved, worst)  # float32 rounding (~2e-7), not a rescaling


def test_the_kd_weight_scales_method_kds_own_term_and_the_kd_added_to_another_method():
    """Both paths of the additive form against T^2 * KL(p_t || p_s) in float64: method kd's own
    term times kd_weight (its temperature), and the KD term added beside another method's terms
    (kd_temperature), which stay as they were."""
    import pytest
    from kdlab.loss import Additive
    from kdlab.methods import kd
    from kdlab.methods.base import MethodLoss

    torch.manual_seed(0)
    student_out, teacher_out = (torch.randn(6, 64), torch.randn(6, 5)), (torch.randn(6, 64), torch.randn(6, 5) * 3)
    labels = torch.randint(0, 5, (6,))

    def reference_kd(temperature):
        p_t = F.softmax(teacher_out[-1].double() / temperature, 1)
        log_p_s = F.log_softmax(student_out[-1].double() / temperature, 1)
        return (temperature ** 2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()).item()

    class Other(MethodLoss):
        def terms(self, student_out, teacher_out, labels, index):
            return {"other": student_out[-1].sum()}

    recipe = {"ce_weight": 0.1, "kd_weight": 0.9, "kd_temperature": 2.0}
    own = Additive(kd.Loss({"temperature": 4.0}, {}), recipe, own_kd=True)(student_out, teacher_out, labels, None)
    assert set(own) == {"kd"} and own["kd"].item() == pytest.approx(0.9 * reference_kd(4.0), rel=1e-5)
    added = Additive(Other(), recipe, own_kd=False)(student_out, teacher_out, labels, None)
    assert set(added) == {"other", "kd"} and added["other"].item() == pytest.approx(student_out[-1].sum().item())
    assert added["kd"].item() == pytest.approx(0.9 * reference_kd(2.0), rel=1e-5)
    assert reference_kd(2.0) != pytest.approx(reference_kd(4.0), rel=1e-2)  # the temperature is checked too
