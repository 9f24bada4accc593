"""Each method's loss against a float64 reference written from the formulas in methods.md."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from kdlab.config import ConfigError, resolve_run
from kdlab.data import load_dataset
from kdlab.methods import METHODS, fitnets, ft, kd, rkd
from kdlab.runio import atomic_torch_save

from conftest import every_method_loss, model_outputs, tiny_run

FT_SETTINGS = {"rate": 0.5, "weight": 500.0, "factor": "flatten", "translator_bn": False,
               "paraphraser_loss": "l1", "paraphraser_epochs": 1, "paraphraser_lr": 0.1}


def features(batch, seed, scale=1.0):
    return model_outputs(batch, seed, 10, scale)


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rel_close(value, reference, rtol=1e-5):
    return abs(value - reference) <= rtol * abs(reference)


def test_kd_matches_reference():
    s, t = features(8, 0), features(8, 1)
    T = 3.0
    value = kd.Loss({"temperature": T}, {})(s, t, torch.zeros(8, dtype=torch.long))["kd"].item()
    reference = 0.0
    for b in range(8):
        zs, zt = s[-1][b].double().numpy() / T, t[-1][b].double().numpy() / T
        log_ps = zs - math.log(np.exp(zs).sum())
        pt = np.exp(zt) / np.exp(zt).sum()
        reference += sum(pt[c] * (math.log(pt[c]) - log_ps[c]) for c in range(10))
    reference = T * T * reference / 8
    assert rel_close(value, reference)


@pytest.mark.parametrize("guided,hint,kind", [(0, 1, nn_kind) for nn_kind in ["conv3x3_stride2"]] +
                         [(1, 0, "deconv4x4_stride2"), (2, 2, "conv1x1")])
def test_fitnets_connector_and_loss_match_reference(guided, hint, kind):
    settings = {"guided_layer": guided, "hint_layer": hint, "weight": 100.0}
    loss = fitnets.Loss(settings, {})
    assert fitnets.connector_kind(*[[32, 16, 8][i] for i in (guided, hint)]) == kind
    s, t = features(4, 2), features(4, 3)
    value = loss(s, t, torch.zeros(4, dtype=torch.long))["fitnets_hint"].item()
    regressed = copy.deepcopy(loss.connector).double()(s[guided].double())
    assert regressed.shape == t[hint].shape
    diff = (regressed - t[hint].double()).detach().numpy().ravel()
    reference = 100.0 * sum(d * d for d in diff) / diff.size
    assert rel_close(value, reference)


def test_fitnets_rejects_unmappable_layers_at_start_up():
    with pytest.raises(ConfigError, match=r"config key 'method_settings': .*guided_layer 0 \(32x32\) cannot be "
                                          r"mapped onto hint_layer 2 \(8x8\)"):
        resolve_run(tiny_run(kind="distill", method="fitnets", teacher="ResNet8", teacher_weights="x",
                             alpha=0.5, method_settings={"guided_layer": 0, "hint_layer": 2}))


def rkd_reference(s, t, distance_weight, angle_weight):
    s, t = s.double().numpy(), t.double().numpy()
    b = len(s)

    def distances(e):
        d = np.zeros((b, b))
        for i, j in itertools.product(range(b), range(b)):
            if i != j:
                d[i, j] = math.sqrt(sum((e[i] - e[j]) ** 2))
        return d / (d.sum() / (b * b - b))

    def angles(e):
        a = np.zeros((b, b, b))
        for i, j, k in itertools.product(range(b), repeat=3):
            if j != i and k != i:
                u, v = e[j] - e[i], e[k] - e[i]
                a[i, j, k] = u @ v / (math.sqrt(u @ u) * math.sqrt(v @ v))
        return a

    ds, dt, as_, at = distances(s), distances(t), angles(s), angles(t)
    distance = sum(huber(x) for x in (ds - dt).ravel()) / ds.size
    angle = sum(huber(x) for x in (as_ - at).ravel()) / as_.size
    return distance_weight * distance, angle_weight * angle


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_rkd_distance_and_triplet_angle_match_reference(scale):
    s, t = features(7, 4), features(7, 5, scale=scale)
    settings = {"distance_weight": 1.5, "angle_weight": 2.0, "angle": "triplet"}
    terms = rkd.Loss(settings, {})(s, t, torch.zeros(7, dtype=torch.long))
    distance, angle = rkd_reference(s[-2], t[-2], 1.5, 2.0)
    assert rel_close(terms["rkd_distance"].item(), distance)
    assert rel_close(terms["rkd_angle"].item(), angle)


def test_rkd_pairwise_cosine_is_an_explicit_other_variant():
    s, t = features(6, 6), features(6, 7)
    triplet = rkd.Loss({"distance_weight": 1, "angle_weight": 1, "angle": "triplet"}, {})(s, t, None or torch.zeros(6))
    pairwise = rkd.Loss({"distance_weight": 1, "angle_weight": 1, "angle": "pairwise_cosine"}, {})(s, t, torch.zeros(6))
    es, et = s[-2].double().numpy(), t[-2].double().numpy()
    cos = lambda e: (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T  # noqa: E731
    reference = sum(huber(x) for x in (cos(es) - cos(et)).ravel()) / 36
    assert rel_close(pairwise["rkd_angle"].item(), reference)
    assert not rel_close(pairwise["rkd_angle"].item(), triplet["rkd_angle"].item(), rtol=1e-2)


def make_paraphraser(path, settings=FT_SETTINGS, seed=0):
    torch.manual_seed(seed)
    paraphraser = ft.Paraphraser(settings["rate"])
    atomic_torch_save(path, {"state_dict": paraphraser.state_dict(), "settings": settings})
    return paraphraser


def test_ft_factor_loss_matches_reference(tmp_path):
    paraphraser = make_paraphraser(tmp_path / "paraphraser.pth")
    loss = ft.Loss(FT_SETTINGS, {"paraphraser": str(tmp_path / "paraphraser.pth")})
    s, t = features(3, 8), features(3, 9)
    value = loss(s, t, torch.zeros(3))["ft_factor"].item()
    enc_t = paraphraser.encoder.double()(t[2].double()).detach().numpy().reshape(3, -1)
    enc_s = copy.deepcopy(loss.translator).double()(s[2].double()).detach().numpy().reshape(3, -1)
    assert enc_t.shape == (3, 32 * 8 * 8)  # rate 0.5: k * 64 channels
    total = 0.0
    for b in range(3):
        fs, ft_ = enc_s[b] / math.sqrt(enc_s[b] @ enc_s[b]), enc_t[b] / math.sqrt(enc_t[b] @ enc_t[b])
        total += sum(abs(x) for x in fs - ft_)
    assert rel_close(value, 500.0 * total / enc_t.size)
    # The paraphraser is frozen and stays in eval mode; only the translator trains.
    loss.train()
    assert not loss.paraphraser.training
    assert all(not p.requires_grad for p in loss.paraphraser.parameters())


def test_ft_channel_mean_factor_matches_reference(tmp_path):
    paraphraser = make_paraphraser(tmp_path / "paraphraser.pth")
    settings = {**FT_SETTINGS, "factor": "channel_mean_sq", "weight": 200.0}
    loss = ft.Loss(settings, {"paraphraser": str(tmp_path / "paraphraser.pth")})
    s, t = features(2, 12), features(2, 13)
    value = loss(s, t, torch.zeros(2))["ft_factor"].item()
    enc_t = paraphraser.encoder.double()(t[2].double()).detach().numpy()
    enc_s = copy.deepcopy(loss.translator).double()(s[2].double()).detach().numpy()
    total = 0.0
    for b in range(2):
        at = (enc_t[b] ** 2).mean(0).ravel()  # mean over channels of the squared map: H*W values
        as_ = (enc_s[b] ** 2).mean(0).ravel()
        total += sum(abs(x) for x in as_ / math.sqrt(as_ @ as_) - at / math.sqrt(at @ at))
    assert rel_close(value, 200.0 * total / (2 * 64))


def test_every_method_declares_documented_settings():
    """Beyond the interface that importing kdlab.methods checks: versions from 1, descriptions that say something."""
    for name, module in METHODS.items():
        assert module.VERSION >= 1
        for key, spec in module.SETTINGS.items():
            assert len(spec["description"]) > 20, (name, key)


def test_a_method_module_missing_part_of_the_interface_is_named_with_what_it_misses():
    """Such a module passed `kdlab check-config` and failed in its jobs (KeyError, AttributeError)."""
    import types
    from kdlab.methods import check_interfaces, interface_problems
    mse = types.ModuleType("kdlab.methods.mse")
    mse.NAME, mse.VERSION, mse.Loss = "mse", 1, kd.Loss
    mse.SETTINGS = {"weight": {"type": "number", "description": "the weight of the squared logit error"}}
    mse.TEACHER_OUTPUTS = "logits"
    assert interface_problems(mse) == ["NEEDS_TEACHER (bool)", "TEACHER_OUTPUTS must be one of (None, "
                                       "'logits+embedding')", "SETTINGS['weight'] needs a default and a description"]
    with pytest.raises(TypeError, match=r"^kdlab/methods/mse.py: missing or wrong: NEEDS_TEACHER \(bool\); "):
        check_interfaces([mse])


def terms_of_every_method(name, tmp_path, student_out, teacher_out):
    """Method `name`'s loss terms on the tiny data's first 8 training images, with fixed seeds."""
    torch.manual_seed(0)
    loss = every_method_loss(name, tmp_path).train()
    loss.start_epoch(0)
    index = torch.arange(8)
    labels = torch.as_tensor(load_dataset(resolve_run(tiny_run())["data"]).train_y[:8], dtype=torch.int64)
    return loss(student_out, teacher_out, labels, index)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_which_student_outputs_its_loss_reads(name, tmp_path):
    """STUDENT_OUTPUTS = "logits+embedding" detaches the student's stage features in training
    (kdlab/train.py student_forward): a method that declares it but reads a feature would
    silently train without that term's gradient, and one that reads none but does not say so
    pays for zero gradients in every compiled step."""
    student_out = tuple(x.requires_grad_() for x in features(8, 0)[:4] + (torch.randn(8, 5),))
    terms = terms_of_every_method(name, tmp_path, student_out, features(8, 1)[:4] + (torch.randn(8, 5),))
    if terms:
        sum(terms.values()).backward()
    reads_features = any(x.grad is not None and x.grad.abs().sum() > 0 for x in student_out[:3])
    declared = getattr(METHODS[name], "STUDENT_OUTPUTS", None)
    assert reads_features == (declared is None), (name, reads_features, declared)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.NEEDS_TEACHER))
def test_every_method_declares_which_teacher_outputs_its_loss_reads(name, tmp_path):
    """TEACHER_OUTPUTS = "logits+embedding" serves the teacher from the cache, which holds no
    stage features: the terms must not change when those are NaN, and a method whose terms
    do not change must say so (the cache would spare it the live teacher)."""
    student_out = features(8, 0)[:4] + (torch.randn(8, 5),)
    teacher_out = features(8, 1)[:4] + (torch.randn(8, 5),)
    with_features = terms_of_every_method(name, tmp_path, student_out, teacher_out)
    nan_features = tuple(torch.full_like(x, float("nan")) for x in teacher_out[:3]) + teacher_out[3:]
    without = terms_of_every_method(name, tmp_path, student_out, nan_features)
    unchanged = all(torch.equal(with_features[k], without[k]) for k in with_features)
    declared = getattr(METHODS[name], "TEACHER_OUTPUTS", None)
    assert unchanged == (declared == "logits+embedding"), (name, with_features, without)
