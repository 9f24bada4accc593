"""AT, SP, PKT, CC, NST, VID, DKD, DIST: each loss against a float64 reference written from
the formulas in methods.md (values and input gradients); every method's loss (CRD's: test_crd.py)
finite under any batch; DKD's ramp, the learned parts and the stage settings. End to end
(learning, resume): test_distill.py."""

import re
from pathlib import Path

import pytest
import torch

from kdlab.config import resolve_run
from kdlab.methods import METHODS, at, cc, dist, dkd, nst, pkt, sp, vid

from conftest import default_settings, every_method_loss, model_outputs, tiny_run

BASELINES = ["at", "sp", "pkt", "cc", "nst", "vid", "dkd", "dist"]
# The other methods' float64 reference tests: a method registered without one fails below.
REFERENCED_ELSEWHERE = {"kd": "test_methods.py", "fitnets": "test_methods.py", "rkd": "test_methods.py",
                        "ft": "test_methods.py", "crd": "test_crd.py"}
CLASSES = 5


def features(batch, seed, scale=1.0, dtype=torch.float64):
    return model_outputs(batch, seed, CLASSES, scale, dtype)


def labels_for(batch):
    return torch.arange(batch) % CLASSES


def rel_err(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


# --- references, written from the formulas with loops and explicit sums -----------------------

def unit(v):
    return v / torch.sqrt((v * v).sum())


def at_reference(s, t, settings):
    total = 0
    for stage in settings["stages"]:
        for b in range(len(s[0])):
            a_s = unit((s[stage][b] ** settings["p"]).mean(0).flatten())
            a_t = unit((t[stage][b] ** settings["p"]).mean(0).flatten())
            total = total + ((a_s - a_t) ** 2).sum() / (len(s[0]) * a_s.numel())
    return {"at": settings["weight"] * total}


def sp_reference(s, t, settings):
    total = 0
    for stage in settings["stages"]:
        fs, ft = s[stage].flatten(1), t[stage].flatten(1)
        n = len(fs)
        for i in range(n):
            g_s = unit(torch.stack([fs[i] @ fs[j] for j in range(n)]))
            g_t = unit(torch.stack([ft[i] @ ft[j] for j in range(n)]))
            total = total + ((g_t - g_s) ** 2).sum() / n ** 2
    return {"sp": settings["weight"] * total}


def pkt_reference(s, t, settings):
    eps, n = 1e-7, len(s[-2])

    def probabilities(e):
        e = [v / (torch.sqrt((v * v).sum()) + eps) for v in e]
        rows = [torch.stack([(e[i] @ e[j] + 1) / 2 for j in range(n)]) for i in range(n)]
        return [r / r.sum() for r in rows]

    p_s, p_t = probabilities(s[-2]), probabilities(t[-2])
    total = sum((p_t[i] * torch.log((p_t[i] + eps) / (p_s[i] + eps))).sum() for i in range(n))
    return {"pkt": settings["weight"] * total / n ** 2}


def cc_reference(s, t, settings, loss):
    w_s, b_s = loss.embed_s.weight.detach(), loss.embed_s.bias.detach()
    w_t, b_t = loss.embed_t.weight.detach(), loss.embed_t.bias.detach()
    e_s = [w_s @ v + b_s for v in s[-2]]
    e_t = [w_t @ v + b_t for v in t[-2]]
    if settings["normalize"]:
        e_s, e_t = [unit(v) for v in e_s], [unit(v) for v in e_t]
    d = [torch.abs(a - b) for a, b in zip(e_s, e_t)]
    total = sum((d[i] * d[i + 1]).sum() for i in range(len(d) - 1)) / (len(d) - 1)
    return {"cc": settings["weight"] * total}


def nst_reference(s, t, settings):
    total = 0
    for stage in settings["stages"]:
        fs = s[stage].flatten(2)
        fs = fs / torch.sqrt((fs * fs).sum(2, keepdim=True))
        ft = t[stage].flatten(2)
        ft = ft / torch.sqrt((ft * ft).sum(2, keepdim=True))
        k = lambda a, b: torch.einsum("bip,bjp->bij", a, b).pow(2).mean()  # noqa: E731
        total = total + k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)
    return {"nst": settings["weight"] * total}


def vid_reference(s, t, settings, loss):
    total = 0
    for stage in settings["stages"]:
        part = loss.vid[str(stage)]
        w1, w2, w3 = (part.regressor[i].weight.detach()[:, :, 0, 0] for i in (0, 2, 4))
        h = torch.einsum("oc,bchw->bohw", w1, s[stage]).relu()
        h = torch.einsum("oc,bchw->bohw", w2, h).relu()
        mean = torch.einsum("oc,bchw->bohw", w3, h)
        var = torch.log(1 + torch.exp(part.raw_variance.detach())) + 1e-5
        nll = 0.5 * ((mean - t[stage]) ** 2 / var.view(1, -1, 1, 1) + torch.log(var).view(1, -1, 1, 1))
        total = total + nll.sum() / nll.numel()
    return {"vid": settings["weight"] * total}


def dkd_reference(s, t, settings, labels, ramp):
    T, n = settings["temperature"], len(labels)
    tckd = nckd = 0
    for b in range(n):
        y = labels[b]
        p_s, p_t = torch.exp(s[-1][b] / T), torch.exp(t[-1][b] / T)
        p_s, p_t = p_s / p_s.sum(), p_t / p_t.sum()
        bin_s = torch.stack([p_s[y], 1 - p_s[y]])
        bin_t = torch.stack([p_t[y], 1 - p_t[y]])
        tckd = tckd + (bin_t * torch.log(bin_t / bin_s)).sum()
        keep = [c for c in range(len(p_s)) if c != y]
        q_s, q_t = p_s[keep] / p_s[keep].sum(), p_t[keep] / p_t[keep].sum()
        nckd = nckd + (q_t * torch.log(q_t / q_s)).sum()
    scale = settings["weight"] * ramp * T * T / n
    return {"dkd_tckd": scale * settings["tckd_weight"] * tckd, "dkd_nckd": scale * settings["nckd_weight"] * nckd}


def dist_reference(s, t, settings):
    T = settings["temperature"]
    p_s, p_t = torch.softmax(s[-1] / T, 1), torch.softmax(t[-1] / T, 1)

    def pearson(a, b):
        a, b = a - a.sum() / len(a), b - b.sum() / len(b)
        return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()) + 1e-8)

    inter = 1 - sum(pearson(p_s[i], p_t[i]) for i in range(len(p_s))) / len(p_s)
    intra = 1 - sum(pearson(p_s[:, c], p_t[:, c]) for c in range(p_s.shape[1])) / p_s.shape[1]
    scale = settings["weight"] * T * T
    return {"dist_inter": scale * settings["inter_weight"] * inter, "dist_intra": scale * settings["intra_weight"] * intra}


CASES = {  # settings that differ from the defaults, so that each setting is exercised
    "at": [{}, {"p": 4, "stages": [1, 2]}],
    "sp": [{}, {"stages": [0, 2]}],
    "pkt": [{}],
    "cc": [{}, {"normalize": True, "embed_dim": 7}],
    "nst": [{}, {"stages": [2]}],
    "vid": [{}, {"init_variance": 0.5, "stages": [0]}],
    "dkd": [{}, {"tckd_weight": 0.5, "nckd_weight": 2.0, "temperature": 2.0}],
    "dist": [{}, {"inter_weight": 1.0, "intra_weight": 0.5, "temperature": 1.0}],
}


def reference(name, s, t, settings, loss, labels):
    if name == "cc":
        return cc_reference(s, t, settings, loss)
    if name == "vid":
        return vid_reference(s, t, settings, loss)
    if name == "dkd":
        return dkd_reference(s, t, settings, labels, loss.ramp)
    return {"at": at_reference, "sp": sp_reference, "pkt": pkt_reference, "nst": nst_reference,
            "dist": dist_reference}[name](s, t, settings)


def test_every_registered_method_has_a_float64_reference_test():
    missing = sorted(set(METHODS) - {"none"} - {*BASELINES, *REFERENCED_ELSEWHERE})
    assert not missing, (f"no float64 reference test for {missing}: add the method to BASELINES, CASES and "
                         f"reference() here, or to REFERENCED_ELSEWHERE with a test_<name>_..match..reference "
                         f"in that file")
    assert not {*BASELINES, *REFERENCED_ELSEWHERE} - set(METHODS), "a reference test for a method not registered"
    for name, test_file in REFERENCED_ELSEWHERE.items():
        assert re.search(rf"def test_{name}_\w*match\w*reference", (Path(__file__).parent / test_file).read_text()), name


@pytest.mark.parametrize("name,overrides", [(n, o) for n in BASELINES for o in CASES[n]])
def test_loss_and_input_gradients_match_float64_reference(name, overrides):
    settings = {**default_settings(name), **overrides}
    torch.manual_seed(0)
    loss = METHODS[name].Loss(settings, {}).double()
    if name == "vid":  # a variance that is not the same in every channel
        for part in loss.vid.values():
            part.raw_variance.data += torch.linspace(-1, 1, len(part.raw_variance), dtype=torch.float64)
    batch, labels = 5, labels_for(5)
    s = tuple(x.requires_grad_() for x in features(batch, 1, scale=3.0))
    t = features(batch, 2, scale=3.0)
    terms = loss(s, t, labels)  # MethodLoss.forward: the path training takes
    s_ref = tuple(x.detach().clone().requires_grad_() for x in s)
    expected = reference(name, s_ref, t, settings, loss, labels)
    assert set(terms) == set(expected)
    for key in terms:
        assert terms[key].dtype == torch.float64
        assert abs(terms[key].item() - expected[key].item()) <= 1e-6 * abs(expected[key].item()), key
        assert expected[key].item() != 0
    grads = torch.autograd.grad(sum(terms.values()), s, allow_unused=True)
    grads_ref = torch.autograd.grad(sum(expected.values()), s_ref, allow_unused=True)
    checked = 0
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert rel_err(g, g_ref) <= 1e-6
            checked += 1
    assert checked


def test_dkd_weight_ramps_over_the_warmup_epochs():
    loss = dkd.Loss({**default_settings("dkd"), "warmup_epochs": 4}, {})
    ramps = []
    for epoch in range(6):
        loss.start_epoch(epoch)
        ramps.append(loss.ramp)
    assert ramps == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # mdistiller: min(epoch / warmup, 1), epochs from 1
    s, t = features(4, 5), features(4, 6)
    loss.start_epoch(0)
    quarter = loss(s, t, labels_for(4))
    loss.start_epoch(10)
    full = loss(s, t, labels_for(4))
    assert all(abs(4 * quarter[k].item() - full[k].item()) <= 1e-12 * full[k].item() for k in full)
    no_ramp = dkd.Loss({**default_settings("dkd"), "warmup_epochs": 0}, {})
    assert no_ramp.ramp == 1.0


def test_learned_parts_are_parameters_of_the_loss():
    names = {n for n, _ in cc.Loss(default_settings("cc"), {}).named_parameters()}
    assert names == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    vid_loss = vid.Loss(default_settings("vid"), {})
    assert {n for n in vid_loss.state_dict() if "raw_variance" in n} == {f"vid.{i}.raw_variance" for i in range(3)}
    variance = torch.nn.functional.softplus(vid_loss.vid["0"].raw_variance) + 1e-5
    assert torch.allclose(variance, torch.full_like(variance, 5.0))
    for module in (at, sp, pkt, nst, dkd, dist):
        assert not list(module.Loss(default_settings(module.NAME), {}).parameters())


def test_stage_settings_are_validated():
    from kdlab.config import ConfigError
    for bad in ([], [0, 0], [3]):
        with pytest.raises(ConfigError, match="config key 'method_settings.stages"):
            resolve_run(tiny_run(kind="distill", method="at", teacher="ResNet8", teacher_weights="x", alpha=0.5,
                                 method_settings={"stages": bad}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("none", "crd")])  # CRD's: test_crd.py
@pytest.mark.parametrize("case", ["duplicates", "teacher_is_student", "large", "tiny", "batch_of_one"])
def test_values_and_gradients_stay_finite(name, dtype, case, tmp_path):
    torch.manual_seed(0)
    loss_fn = every_method_loss(name, tmp_path)
    batch = 1 if case == "batch_of_one" else 6
    scale = {"large": 1e4, "tiny": 1e-30}.get(case, 1.0)
    s, t = features(batch, 10, scale=scale, dtype=torch.float32), features(batch, 11, dtype=torch.float32)
    if case in ("duplicates", "teacher_is_student"):  # every sample twice: zero distances and difference vectors
        s = tuple(torch.cat([x[:3], x[:3]]) for x in s)
        t = s if case == "teacher_is_student" else tuple(torch.cat([x[:3], x[:3]]) for x in t)
    if name == "dist" and case == "tiny" and dtype == torch.float16:
        # fp16 flushes the logits to 0: every probability column is constant, and the authors'
        # Pearson (a.b) / (|a||b| + 1e-8) has slope |b| / 1e-8 there, finite in float32 but
        # beyond fp16's range on the way back to fp16 logits (the GradScaler skips such a step).
        dtype = torch.float32
        s, t = tuple(x.half().float() for x in s), tuple(x.half().float() for x in t)
    s = tuple(x.to(dtype).requires_grad_() for x in s)  # what autocast hands the loss
    assert all(torch.isfinite(x).all() for x in s)  # large, yet representable in fp16
    with torch.autocast("cpu", dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
                        enabled=dtype != torch.float32):
        terms = loss_fn(s, tuple(x.to(dtype).detach() for x in t), labels_for(batch))
        total = sum(terms.values())
    assert all(v.dtype == torch.float32 for v in terms.values())
    total.backward()
    assert torch.isfinite(total)
    grads = [x.grad for x in s if x.grad is not None] + [p.grad for p in loss_fn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if case == "batch_of_one" and name == "rkd":
        assert total.item() == 0.0  # no pairs: skipped, not NaN
