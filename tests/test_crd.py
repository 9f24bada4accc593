"""CRD: the loss against a float64 reference written from RepDistiller's formulas, the
negative sampler, numerics, training with KD in the additive form, and bit-identical resume
of its memory banks (its convex form learns in test_distill.py, with every method)."""

import copy

import pytest
import torch

import kdlab.train
from kdlab.config import method_settings, resolve_run
from kdlab.data import load_dataset
from kdlab.methods import crd
from kdlab.train import train

from conftest import comparable, interrupt_after_checkpoints, tiny_run, tiny_student

N = 320  # TINY_DATA's training set
CHANCE, MARGIN = 100 / 5, 40


def crd_loss(**settings):
    data = resolve_run(tiny_run())["data"]
    return crd.Loss(method_settings("crd", settings, "methods.crd"),
                    {"data": data, "seed": 3, "train_labels": load_dataset(data).train_y})


def outputs(batch, seed, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(batch, 64, generator=g, dtype=torch.float64) * scale).requires_grad_(requires_grad)
    stage = torch.zeros(batch, 1, dtype=torch.float64)  # CRD reads only the embedding
    return (stage, stage, stage, emb, torch.randn(batch, 5, generator=g, dtype=torch.float64))


def reference(loss, s_emb, t_emb, memory_s, memory_t, contrast, settings):
    """RepDistiller's CRDLoss written out in float64: returns (loss, Z_s, Z_t, new banks)."""
    T, k, m = settings["nce_t"], contrast.shape[1] - 1, settings["nce_m"]

    def embed(linear, x):
        y = x @ linear.weight.t() + linear.bias
        return y / y.pow(2).sum(1, keepdim=True).sqrt()

    v_s, v_t = embed(loss.embed_s, s_emb), embed(loss.embed_t, t_emb)

    def side(v, bank):  # anchor v, positive and negatives from the other side's bank
        rows = []
        for i in range(len(v)):
            rows.append(torch.stack([torch.exp(torch.dot(v[i], bank[j]) / T) for j in contrast[i]]))
        scores = torch.stack(rows)
        z = scores.detach().mean() * N  # estimated on the first batch, then a constant
        p = scores / z
        noise = k / N  # m * Pn with Pn = 1 / N
        total = 0.0
        for i in range(len(v)):
            total = total + torch.log(p[i, 0] / (p[i, 0] + noise + 1e-7))
            for j in range(1, k + 1):
                total = total + torch.log(noise / (p[i, j] + noise + 1e-7))
        return -total / len(v), z

    loss_s, z_s = side(v_s, memory_t)
    loss_t, z_t = side(v_t, memory_s)
    banks = []
    for bank, v in ((memory_s, v_s), (memory_t, v_t)):
        bank = bank.clone()
        for i, row in zip(contrast[:, 0].tolist(), v.detach()):
            moved = m * bank[i] + (1 - m) * row
            bank[i] = moved / moved.norm()
        banks.append(bank)
    return settings["weight"] * (loss_s + loss_t), z_s, z_t, banks


def test_crd_matches_float64_reference_in_values_gradients_and_state():
    settings = method_settings("crd", {"nce_k": 10}, "methods.crd")
    loss = crd_loss(nce_k=10).double()
    g = torch.Generator().manual_seed(5)
    memory_s, memory_t = (torch.nn.functional.normalize(torch.randn(N, 128, generator=g, dtype=torch.float64), dim=1)
                          for _ in range(2))
    loss.memory_s, loss.memory_t = memory_s.clone(), memory_t.clone()
    index = torch.tensor([3, 17, 40, 41, 200, 319])
    negatives = torch.randint(0, N, (6, 10), generator=g)
    contrast = torch.cat([index.unsqueeze(1), negatives], dim=1)
    loss.sample = lambda index, labels: contrast  # fixed negatives
    ref_modules = copy.deepcopy(loss)
    s, t = outputs(6, 0, requires_grad=True), outputs(6, 1)
    value = loss(s, t, loss.dataset_labels[index], index)["crd"]
    value.backward()
    grads = [s[3].grad, *(p.grad for p in loss.parameters())]

    s_ref = s[3].detach().clone().requires_grad_()
    expected, z_s, z_t, banks = reference(ref_modules, s_ref, t[3], memory_s, memory_t, contrast, settings)
    expected.backward()
    expected_grads = [s_ref.grad, *(p.grad for p in ref_modules.parameters())]
    assert len(grads) == 5 and all(g is not None for g in grads + expected_grads)

    assert abs(value.item() - expected.item()) <= 1e-6 * abs(expected.item())
    for got, want in zip(grads, expected_grads):
        assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)
    assert torch.allclose(loss.z, torch.stack([z_s, z_t]), rtol=1e-12)
    assert torch.allclose(loss.memory_s, banks[0], rtol=0, atol=1e-12)
    assert torch.allclose(loss.memory_t, banks[1], rtol=0, atol=1e-12)
    z = loss.z.clone()
    loss(outputs(6, 2), t, loss.dataset_labels[index], index)
    assert torch.equal(loss.z, z)  # Z is estimated once, then kept


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_sampler_draws_other_class_negatives_reproducibly(mode):
    loss = crd_loss(nce_k=50, mode=mode)
    index = torch.tensor([0, 5, 77, 300])
    labels = loss.dataset_labels[index]
    contrast = loss.sample(index, labels)
    assert contrast.shape == (4, 51)
    negatives = contrast[:, 1:]
    assert (loss.dataset_labels[negatives] != labels.unsqueeze(1)).all()
    assert all(len(set(row.tolist())) == 50 for row in negatives)  # without replacement, as RepDistiller here
    if mode == "exact":
        assert torch.equal(contrast[:, 0], index)
    else:
        assert torch.equal(loss.dataset_labels[contrast[:, 0]], labels)
    assert torch.equal(loss.sample(index, labels), contrast)  # a function of (seed, epoch, step)
    loss.step += 1
    assert not torch.equal(loss.sample(index, labels), contrast)
    loss.start_epoch(0)
    assert torch.equal(loss.sample(index, labels), contrast)


def test_nce_k_is_clamped_to_the_smallest_other_class_pool(capsys):
    loss = crd_loss(nce_k=100_000)
    pool = N - int(torch.bincount(loss.dataset_labels).max())
    assert loss.k == pool and f"drawing {pool} negatives per sample" in capsys.readouterr().out


def test_crd_needs_the_dataset_index():
    with pytest.raises(ValueError, match="dataset index"):
        crd_loss(nce_k=8)(outputs(2, 0), outputs(2, 1), torch.zeros(2, dtype=torch.long), None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["batch_of_one", "duplicates", "large", "tiny"])
def test_crd_stays_finite(case, dtype):
    loss = crd_loss(nce_k=16)
    batch = 1 if case == "batch_of_one" else 6
    scale = {"large": 1e4, "tiny": 1e-6}.get(case, 1.0)
    index = torch.tensor([7] * batch) if case == "duplicates" else torch.arange(batch) * 11
    s = tuple(x.to(dtype).requires_grad_() for x in outputs(batch, 0, scale))
    t = tuple(x.to(dtype) for x in outputs(batch, 1, scale))
    for _ in range(2):  # the second call uses the stored Z and the updated banks
        with torch.autocast("cpu", dtype=dtype):
            total = loss(s, t, loss.dataset_labels[index], index)["crd"]
        total.backward()
        assert torch.isfinite(total)
        assert torch.isfinite(s[3].grad).all() and all(torch.isfinite(p.grad).all() for p in loss.parameters())
    assert torch.isfinite(loss.memory_s).all() and torch.isfinite(loss.z).all()


@pytest.fixture(scope="module")
def additive_crd_kd(trained_teacher, tmp_path_factory):
    run = tiny_student("crd", trained_teacher[0], additive={"ce_weight": 1.0, "kd_weight": 1.0},
                       method_settings={"nce_k": 64}, training={"epochs": 3, "milestones": [2]})
    run_dir = tmp_path_factory.mktemp("crd_additive")
    return run, run_dir, train(run, run_dir)


def test_crd_plus_kd_learns_in_the_additive_form(additive_crd_kd):
    _, _, metrics = additive_crd_kd
    assert metrics["best_acc"] >= CHANCE + MARGIN, metrics["history"]["test_acc"]
    h = metrics["history"]
    assert set(h["terms"]) == {"ce", "crd", "kd"}
    assert h["train_loss"][0] == pytest.approx(h["terms"]["ce"][0] + h["terms"]["crd"][0] + h["terms"]["kd"][0],
                                               rel=1e-6)
    assert {k: metrics["run"][k] for k in ("alpha", "loss_form", "ce_weight", "kd_weight", "recipe")} == \
        {"alpha": None, "loss_form": "additive", "ce_weight": 1.0, "kd_weight": 1.0, "recipe": "additive_ce1_kd1"}


def test_crd_resumes_bit_identically_after_an_interruption(additive_crd_kd, tmp_path):
    run, reference_dir, reference = additive_crd_kd
    interrupt_after_checkpoints(kdlab.train, 2, train, run, tmp_path)
    interrupted = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert interrupted["epoch"] == 2 and (interrupted["method"]["method.z"] > 0).all()
    metrics = train(run, tmp_path)
    assert metrics["resumed_at_epochs"] == [2]
    assert comparable(metrics) == comparable(reference)
    final, expected = (torch.load(d / "checkpoint.pth", weights_only=True)["method"] for d in (tmp_path, reference_dir))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    bank = expected["method.memory_s"]  # every row visited, so every row renormalised
    assert bank.shape == (N, 128) and torch.allclose(bank.norm(dim=1), torch.ones(N))
