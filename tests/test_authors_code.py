"""Fidelity to the methods' authors' code, at CIFAR shapes (batch 64, 100 classes, stage maps
16x32x32, 32x16x16, 64x8x8), in float64: each loss, input gradient included, against a
re-expression of the computation its canonical code performs (RepDistiller distiller_zoo/*.py,
crd/*.py and models/resnet.py; mdistiller distillers/DKD.py; DIST's dist_kd.py; the official
Factor Transfer code), including the implementation details that differ from the formulas in
test_methods*.py (RepDistiller's expanded-form pdist and d > 0 mean, PKT's eps on the norm,
DKD's -1000 mask, the conv bias of the FitNet regressor, CRD's gathered bank rows). Also the
defaults and crd.yaml against the authors' hyper-parameters, and the ResNets against
RepDistiller's (parameter counts, the same outputs from the same weights, the initialisation).
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdlab.methods import at, cc, crd, dist, dkd, fitnets, ft, kd, nst, pkt, rkd, sp, vid
from kdlab.models import BLOCKS_PER_STAGE, build_model
from kdlab.teachers import convert, repdistiller_key

from conftest import default_settings

REPO = Path(__file__).resolve().parent.parent
B, CLASSES = 64, 100
STAGE_SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
DOUBLE = torch.float64


def outputs(seed):
    """(stage1, stage2, stage3, embedding, logits) as a CIFAR-100 ResNet returns them (post-ReLU maps)."""
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(B, *shape, generator=g, dtype=DOUBLE).relu() for shape in STAGE_SHAPES]
    embedding = torch.rand(B, 64, generator=g, dtype=DOUBLE) * 2
    return (*stages, embedding, torch.randn(B, CLASSES, generator=g, dtype=DOUBLE) * 4)


S, T = outputs(1), outputs(2)
LABELS = torch.randint(0, CLASSES, (B,), generator=torch.Generator().manual_seed(3))


def assert_same_value_and_gradient(ours, theirs, position):
    """ours(student_out) and theirs(student_out): equal value and equal gradient w.r.t. student_out[position]."""
    values, grads = [], []
    for fn in (ours, theirs):
        x = S[position].clone().requires_grad_()
        value = fn(tuple(x if i == position else S[i] for i in range(5)))
        values.append(value)
        grads.append(torch.autograd.grad(value, x)[0])
    assert abs(values[0].item() - values[1].item()) <= 1e-10 * abs(values[1].item())
    assert (grads[0] - grads[1]).norm() <= 1e-9 * grads[1].norm()
    assert values[1].item() != 0 and grads[1].norm() > 0


def total(loss):
    return lambda s: sum(loss(s, T, LABELS).values())


# --- the distiller_zoo losses, with the weights of RepDistiller's run_cifar_distill.sh ----------

def zoo_at(s, t):  # Attention, p = 2, over feat[1:-1] (the three stage outputs)
    att = lambda f: F.normalize(f.pow(2).mean(1).view(len(f), -1))  # noqa: E731
    return sum((att(a) - att(b)).pow(2).mean() for a, b in zip(s[:3], t[:3]))


def zoo_sp(s, t):  # Similarity over feat[-2] (stage 3)
    fs, ft_ = s[2].view(B, -1), t[2].view(B, -1)
    diff = F.normalize(ft_ @ ft_.t()) - F.normalize(fs @ fs.t())
    return (diff * diff).sum() / (B * B)


def zoo_pkt(s, t, eps=1e-7):  # PKT over feat[-1] (the pooled embedding)
    def probabilities(e):
        e = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
        e = torch.where(torch.isnan(e), torch.zeros_like(e), e)
        sim = (e @ e.t() + 1) / 2
        return sim / sim.sum(1, keepdim=True)
    p_s, p_t = probabilities(s[3]), probabilities(t[3])
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def zoo_nst(s, t):  # NSTLoss, full loss, over feat[1:-1]
    def kernel_mean(a, b):
        return torch.einsum("bip,bjp->bij", a, b).pow(2).mean()
    result = 0
    for a, b in zip(s[:3], t[:3]):
        a, b = F.normalize(a.view(B, a.shape[1], -1), dim=2), F.normalize(b.view(B, b.shape[1], -1), dim=2)
        result = result + kernel_mean(b, b) + kernel_mean(a, a) - 2 * kernel_mean(a, b)
    return result


def zoo_rkd(s, t, w_d=25, w_a=50):  # RKDLoss(25, 50) over feat[-1], pdist in the expanded form
    def pdist(e):
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d / d[d > 0].mean()

    def angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)
    return (w_d * F.smooth_l1_loss(pdist(s[3]), pdist(t[3]).detach())
            + w_a * F.smooth_l1_loss(angles(s[3]), angles(t[3]).detach()))


def test_kd_at_sp_pkt_nst_rkd_compute_what_repdistiller_computes():
    def distill_kl(s, t, temperature=4):  # DistillKL: kl_div(size_average=False) * T^2 / batch
        log_p_s, p_t = F.log_softmax(s[4] / temperature, 1), F.softmax(t[4] / temperature, 1)
        return F.kl_div(log_p_s, p_t, reduction="sum") * temperature ** 2 / B

    assert_same_value_and_gradient(total(kd.Loss(default_settings("kd"), {})), lambda s: distill_kl(s, T), 4)
    for stage in (0, 2):
        assert_same_value_and_gradient(total(at.Loss(default_settings("at"), {})), lambda s: 1000 * zoo_at(s, T), stage)
    assert_same_value_and_gradient(total(sp.Loss(default_settings("sp"), {})), lambda s: 3000 * zoo_sp(s, T), 2)
    assert_same_value_and_gradient(total(pkt.Loss(default_settings("pkt"), {})), lambda s: 30000 * zoo_pkt(s, T), 3)
    assert_same_value_and_gradient(total(nst.Loss(default_settings("nst"), {})), lambda s: 50 * zoo_nst(s, T), 1)
    rkd_paper = rkd.Loss(default_settings("rkd", distance_weight=25.0, angle_weight=50.0), {})
    assert_same_value_and_gradient(total(rkd_paper), lambda s: zoo_rkd(s, T), 3)


def test_cc_vid_fitnet_compute_what_repdistiller_computes():
    torch.manual_seed(0)
    cc_loss = cc.Loss(default_settings("cc"), {}).double()

    def correlation(s):  # LinearEmbed (no normalisation) on both sides, then Correlation
        e_s = F.linear(s[3], cc_loss.embed_s.weight, cc_loss.embed_s.bias)
        e_t = F.linear(T[3], cc_loss.embed_t.weight, cc_loss.embed_t.bias)
        delta = (e_s - e_t).abs()
        return 0.02 * (delta[:-1] * delta[1:]).sum(1).mean()
    assert cc_loss.embed_s.weight.shape == (128, 64)
    assert_same_value_and_gradient(total(cc_loss), correlation, 3)

    vid_loss = vid.Loss(default_settings("vid"), {}).double()
    for part in vid_loss.vid.values():  # VIDLoss(s, t, t) starts every variance at 5
        assert torch.allclose(part.raw_variance, torch.full_like(part.raw_variance, math.log(math.exp(5 - 1e-5) - 1)))
        part.raw_variance.data += torch.linspace(-1, 1, len(part.raw_variance), dtype=DOUBLE)

    def vid_zoo(s):
        result = 0
        for stage in range(3):
            part = vid_loss.vid[str(stage)]
            w1, w2, w3 = (part.regressor[i].weight for i in (0, 2, 4))
            mean = F.conv2d(F.conv2d(F.conv2d(s[stage], w1).relu(), w2).relu(), w3)
            var = (torch.log(1 + torch.exp(part.raw_variance)) + 1e-5).view(1, -1, 1, 1)
            result = result + (0.5 * ((mean - T[stage]) ** 2 / var + torch.log(var))).mean()
        return result
    for stage in (0, 2):
        assert_same_value_and_gradient(total(vid_loss), vid_zoo, stage)

    # ConvReg + HintLoss, RepDistiller's hint_layer 2 (stage 2 onto stage 2) and our default 1 -> 2:
    # the regressor's conv has a bias there, which its BatchNorm (train mode) cancels exactly.
    for guided, hint in ((1, 1), (0, 1), (1, 0)):
        loss = fitnets.Loss(default_settings("fitnets", guided_layer=guided, hint_layer=hint), {}).double().train()
        conv, bn = loss.connector[0], loss.connector[1]
        bias = torch.randn(conv.out_channels, dtype=DOUBLE)

        def conv_reg(s, conv=conv, bn=bn, bias=bias, guided=guided, hint=hint):
            x = s[guided]
            if guided == hint:
                x = F.conv2d(x, conv.weight, bias)
            elif guided < hint:
                x = F.conv2d(x, conv.weight, bias, stride=2, padding=1)
            else:
                x = F.conv_transpose2d(x, conv.weight, bias, stride=2, padding=1)
            x = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps).relu()
            return 100 * F.mse_loss(x, T[hint])
        assert_same_value_and_gradient(total(loss), conv_reg, guided)


def test_dkd_and_dist_compute_what_their_authors_code_computes():
    def mdistiller_dkd(s, alpha, beta, temperature):  # dkd_loss: binary masks, then the -1000 mask
        gt = F.one_hot(LABELS, CLASSES).bool()
        p_s, p_t = F.softmax(s[4] / temperature, 1), F.softmax(T[4] / temperature, 1)
        binary = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
        tckd = F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum") * temperature ** 2 / B
        nckd = F.kl_div(F.log_softmax(s[4] / temperature - 1000.0 * gt, 1),
                        F.softmax(T[4] / temperature - 1000.0 * gt, 1), reduction="sum") * temperature ** 2 / B
        return alpha * tckd + beta * nckd

    for beta in (8.0, 2.0):  # mdistiller's default and its configs for res56->res20, res110->res32
        loss = dkd.Loss(default_settings("dkd", nckd_weight=beta), {})
        for epoch in (0, 7, 19, 239):  # ours 0-based; mdistiller's min(epoch / WARMUP, 1) counts from 1
            loss.start_epoch(epoch)
            assert_same_value_and_gradient(
                total(loss), lambda s: min((epoch + 1) / 20, 1.0) * mdistiller_dkd(s, 1.0, beta, 4.0), 4)

    def dist_kd(s, beta=1.0, gamma=1.0, tau=4.0):  # DIST(beta, gamma, tau), dist_t4
        def relation(a, b):
            a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
            return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()
        y_s, y_t = (s[4] / tau).softmax(1), (T[4] / tau).softmax(1)
        return tau ** 2 * (beta * relation(y_s, y_t) + gamma * relation(y_s.t(), y_t.t()))
    # The authors' CIFAR-100 recipe: CE + kd_loss_weight 2 * DIST(1, 1, tau 4)
    assert_same_value_and_gradient(total(dist.Loss(default_settings("dist"), {})), lambda s: 2 * dist_kd(s), 4)


@pytest.mark.parametrize("factor", ["flatten", "channel_mean_sq"])
def test_ft_computes_what_its_authors_and_repdistiller_compute(factor, tmp_path):
    from kdlab.runio import atomic_torch_save
    # flatten: the authors' Paraphraser/Translator (3x3 convs with bias, LeakyReLU 0.1, no BN),
    # utils.FT and L1Loss, beta 500. channel_mean_sq: RepDistiller's FactorTransfer(p1 2, p2 1)
    # with its BN translator, -b 200.
    authors = factor == "flatten"
    chosen = default_settings("ft", factor=factor, translator_bn=not authors, weight=500.0 if authors else 200.0)
    torch.manual_seed(0)
    paraphraser = ft.Paraphraser(chosen["rate"])
    path = tmp_path / "paraphraser.pth"
    atomic_torch_save(path, {"state_dict": paraphraser.state_dict(), "settings": chosen})
    loss = ft.Loss(chosen, {"paraphraser": str(path)}).double().train()
    encoder_convs = [m for m in loss.paraphraser.encoder if isinstance(m, torch.nn.Conv2d)]
    decoder_convs = [m for m in loss.paraphraser.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    translator_convs = [m for m in loss.translator if isinstance(m, torch.nn.Conv2d)]
    translator_bns = [m for m in loss.translator if isinstance(m, torch.nn.BatchNorm2d)]
    # 64 -> 64 -> 32 -> 32, back 32 -> 32 -> 64 -> 64 (k 0.5), every conv with a bias
    assert [(m.in_channels, m.out_channels) for m in encoder_convs + decoder_convs] == \
        [(64, 64), (64, 32), (32, 32), (32, 32), (32, 64), (64, 64)]
    assert all(m.bias is not None for m in encoder_convs + decoder_convs + translator_convs)
    assert len(translator_bns) == (0 if authors else 3)

    def stack(x, convs, bns=(), transposed=False):
        for i, conv in enumerate(convs):
            x = (F.conv_transpose2d if transposed else F.conv2d)(x, conv.weight, conv.bias, padding=1)
            if bns:
                x = F.batch_norm(x, None, None, bns[i].weight, bns[i].bias, training=True, eps=bns[i].eps)
            x = F.leaky_relu(x, 0.1)
        return x
    factor_t = stack(T[2], encoder_convs)
    reconstruction = stack(factor_t, decoder_convs, transposed=True)  # mode 0 of the authors' Paraphraser
    assert torch.allclose(loss.paraphraser(T[2]), reconstruction, rtol=1e-12, atol=1e-12)

    def theirs(s):
        factor_s = stack(s[2], translator_convs, translator_bns)
        if authors:
            return 500 * F.l1_loss(F.normalize(factor_s.view(B, -1)), F.normalize(factor_t.view(B, -1)))
        att = lambda f: F.normalize(f.pow(2).mean(1).view(B, -1))  # noqa: E731
        return 200 * (att(factor_s) - att(factor_t)).abs().mean()
    assert_same_value_and_gradient(total(loss), theirs, 2)


def test_crd_computes_what_repdistiller_computes_over_two_steps():
    n, k = 2000, 1024  # a CIFAR-100-like label set (20 per class), small enough for gathered bank rows
    train_labels = torch.arange(n) % CLASSES
    loss = crd.Loss(default_settings("crd", nce_k=k), {"seed": 0, "train_labels": train_labels}).double().train()
    stdv = 1 / math.sqrt(128 / 3)  # ContrastMemory's initial banks: uniform in +-stdv
    assert loss.memory_s.abs().max() <= stdv and loss.memory_s.abs().max() > 0.99 * stdv
    bank_s, bank_t = loss.memory_s.clone(), loss.memory_t.clone()  # memory_v1, memory_v2
    z_s = z_t = None
    drawn, sample = {}, loss.sample
    loss.sample = lambda index, labels: drawn.setdefault("contrast", sample(index, labels))
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        drawn.clear()
        index = torch.randperm(n, generator=g)[:B]
        f_s, f_t = torch.rand(B, 64, generator=g, dtype=DOUBLE), torch.rand(B, 64, generator=g, dtype=DOUBLE)
        x = f_s.clone().requires_grad_()
        zero = torch.zeros(B, 1, dtype=DOUBLE)
        ours = loss((zero, zero, zero, x, zero), (zero, zero, zero, f_t, zero), train_labels[index], index)["crd"]
        params = list(loss.parameters())
        ours_grads = torch.autograd.grad(ours, [x] + params)
        contrast = drawn["contrast"]
        assert torch.equal(contrast[:, 0], index)  # 'exact': the positive is the sample itself
        assert (train_labels[contrast[:, 1:]] != train_labels[index].unsqueeze(1)).all()

        # CRDLoss: Embed (linear + L2 norm), ContrastMemory over gathered bank rows, ContrastLoss on both sides
        y = f_s.clone().requires_grad_()
        v1 = F.linear(y, loss.embed_s.weight, loss.embed_s.bias)
        v1 = v1 / v1.pow(2).sum(1, keepdim=True).sqrt()
        v2 = F.linear(f_t, loss.embed_t.weight, loss.embed_t.bias)
        v2 = v2 / v2.pow(2).sum(1, keepdim=True).sqrt()
        rows_v1 = bank_s.index_select(0, contrast.view(-1)).view(B, k + 1, 128)
        rows_v2 = bank_t.index_select(0, contrast.view(-1)).view(B, k + 1, 128)
        out_v2 = torch.exp(torch.bmm(rows_v1, v2.unsqueeze(2)) / 0.07)  # teacher anchor, student bank
        out_v1 = torch.exp(torch.bmm(rows_v2, v1.unsqueeze(2)) / 0.07)  # student anchor, teacher bank
        if z_s is None:  # set once, from the first batch
            z_s, z_t = (out_v1.mean() * n).item(), (out_v2.mean() * n).item()
        noise = k / n

        def contrast_loss(x):
            pos, neg = x[:, 0], x[:, 1:]
            return -(torch.log(pos / (pos + noise + 1e-7)).sum() + torch.log(noise / (neg + noise + 1e-7)).sum()) / B
        theirs = 0.8 * (contrast_loss(out_v1 / z_s) + contrast_loss(out_v2 / z_t))
        theirs_grads = torch.autograd.grad(theirs, [y] + params)
        with torch.no_grad():  # the momentum update of both banks at the batch's indices
            for bank, v in ((bank_s, v1), (bank_t, v2)):
                moved = bank.index_select(0, index) * 0.5 + v * 0.5
                bank.index_copy_(0, index, moved / moved.pow(2).sum(1, keepdim=True).pow(0.5))

        assert abs(ours.item() - theirs.item()) <= 1e-10 * abs(theirs.item())
        for a, b in zip(ours_grads, theirs_grads):
            assert (a - b).norm() <= 1e-9 * b.norm() and b.norm() > 0
        assert torch.allclose(loss.z, torch.tensor([z_s, z_t], dtype=DOUBLE), rtol=1e-12, atol=0)
        assert torch.allclose(loss.memory_s, bank_s, rtol=0, atol=1e-14)
        assert torch.allclose(loss.memory_t, bank_t, rtol=0, atol=1e-14)


# --- defaults and the shipped CRD-paper recipe against the authors' hyper-parameters -----------

AUTHORS_DEFAULTS = {  # RepDistiller's train_student.py / run_cifar_distill.sh, mdistiller, DIST, FT's code
    "kd": {"temperature": 4.0},
    "fitnets": {"weight": 100.0},
    "at": {"weight": 1000.0, "p": 2, "stages": [0, 1, 2]},
    "sp": {"weight": 3000.0, "stages": [2]},
    "pkt": {"weight": 30000.0},
    "cc": {"weight": 0.02, "embed_dim": 128, "normalize": False},
    "nst": {"weight": 50.0, "stages": [0, 1, 2]},
    "vid": {"weight": 1.0, "init_variance": 5.0, "stages": [0, 1, 2]},
    "crd": {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "mode": "exact"},
    "dkd": {"weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "temperature": 4.0, "warmup_epochs": 20},
    "ft": {"rate": 0.5, "weight": 500.0, "factor": "flatten", "translator_bn": False, "paraphraser_loss": "l1",
           "paraphraser_epochs": 6, "paraphraser_lr": 0.1},
}


def test_defaults_are_the_authors_hyper_parameters():
    for name, expected in AUTHORS_DEFAULTS.items():
        assert {key: default_settings(name)[key] for key in expected} == expected, name


def test_crd_config_is_repdistillers_recipe():
    """config/crd.yaml against RepDistiller's scripts/run_cifar_distill.sh (-r 1 unless given) and
    train_student.py defaults; RKD's 25/50 are RKDLoss's own weights (-b 1), FT's paraphraser
    is helper/pretrain.py's (MSE, 30 init epochs at lr 0.01) with models/util.py's BN translator."""
    config = yaml.safe_load((REPO / "config" / "crd.yaml").read_text())
    methods = config["methods"]
    expected = {
        "kd": ([{"ce_weight": 0.1, "kd_weight": 0.9}], {"temperature": 4}),
        "fitnets": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 100, "guided_layer": 1, "hint_layer": 1}),
        "at": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 1000}),
        "sp": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 3000}),
        "cc": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 0.02}),
        "vid": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 1}),
        "rkd": ([{"ce_weight": 1, "kd_weight": 0}], {"distance_weight": 25, "angle_weight": 50, "angle": "triplet"}),
        "pkt": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 30000}),
        "ft": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 200, "factor": "channel_mean_sq", "rate": 0.5,
                                                    "paraphraser_loss": "mse", "paraphraser_epochs": 30,
                                                    "paraphraser_lr": 0.01, "translator_bn": True}),
        "nst": ([{"ce_weight": 1, "kd_weight": 0}], {"weight": 50}),
        "crd": ([{"ce_weight": 1, "kd_weight": 0}, {"ce_weight": 1, "kd_weight": 1}], {"weight": 0.8}),
    }
    for name, (recipes, keys) in expected.items():
        assert methods[name]["additive"] == recipes, name
        assert {key: methods[name].get(key, default_settings(name)[key]) for key in keys} == keys, name
    training = config["training"]
    assert (training["epochs"], training["batch_size"], training["lr"], training["momentum"],
            training["weight_decay"], training["milestones"], training["lr_decay"], training["label_smoothing"]) == \
        (240, 64, 0.05, 0.9, 0.0005, [150, 180, 210], 0.1, 0.0)


# --- the ResNets against RepDistiller's models/resnet.py ---------------------------------------

def repdistiller_state_dict(n, num_classes, generator):
    """Random weights in RepDistiller's layout for resnet(6n+2), with non-trivial BN statistics."""
    state = {}

    def conv(key, c_out, c_in, k):
        state[key] = torch.randn(c_out, c_in, k, k, generator=generator, dtype=DOUBLE) * math.sqrt(2 / (c_out * k * k))

    def bn(key, c):
        state.update({f"{key}.weight": torch.rand(c, generator=generator, dtype=DOUBLE) + 0.5,
                      f"{key}.bias": torch.randn(c, generator=generator, dtype=DOUBLE) * 0.1,
                      f"{key}.running_mean": torch.randn(c, generator=generator, dtype=DOUBLE) * 0.1,
                      f"{key}.running_var": torch.rand(c, generator=generator, dtype=DOUBLE) + 0.5,
                      f"{key}.num_batches_tracked": torch.tensor(0)})
    conv("conv1.weight", 16, 3, 3)
    bn("bn1", 16)
    c_in = 16
    for layer, c in enumerate((16, 32, 64), start=1):
        for i in range(n):
            prefix = f"layer{layer}.{i}"
            conv(f"{prefix}.conv1.weight", c, c_in if i == 0 else c, 3)
            bn(f"{prefix}.bn1", c)
            conv(f"{prefix}.conv2.weight", c, c, 3)
            bn(f"{prefix}.bn2", c)
            if i == 0 and (layer > 1 or c_in != c):  # stride 2 or a width change
                conv(f"{prefix}.downsample.0.weight", c, c_in, 1)
                bn(f"{prefix}.downsample.1", c)
        c_in = c
    state["fc.weight"] = torch.randn(num_classes, 64, generator=generator, dtype=DOUBLE) * 0.1
    state["fc.bias"] = torch.randn(num_classes, generator=generator, dtype=DOUBLE) * 0.1
    return state


def repdistiller_forward(state, x, n, training):
    """ResNet.forward(is_feat=True): [f0, f1, f2, f3, f4], logits with post-ReLU f1..f3."""
    def bn(key, x):
        return F.batch_norm(x, state[f"{key}.running_mean"], state[f"{key}.running_var"], state[f"{key}.weight"],
                            state[f"{key}.bias"], training=training)
    x = bn("bn1", F.conv2d(x, state["conv1.weight"], padding=1)).relu()
    features = [x]
    for layer in (1, 2, 3):
        for i in range(n):
            prefix, stride = f"layer{layer}.{i}", 2 if (layer > 1 and i == 0) else 1
            out = bn(f"{prefix}.bn1", F.conv2d(x, state[f"{prefix}.conv1.weight"], stride=stride, padding=1)).relu()
            out = bn(f"{prefix}.bn2", F.conv2d(out, state[f"{prefix}.conv2.weight"], padding=1))
            if f"{prefix}.downsample.0.weight" in state:
                x = bn(f"{prefix}.downsample.1", F.conv2d(x, state[f"{prefix}.downsample.0.weight"], stride=stride))
            x = (out + x).relu()
        features.append(x)
    pooled = F.avg_pool2d(x, 8).view(len(x), -1)
    return features + [pooled], F.linear(pooled, state["fc.weight"], state["fc.bias"])


def test_resnets_are_repdistillers():
    g = torch.Generator().manual_seed(0)
    for name, n in BLOCKS_PER_STAGE.items():
        state = repdistiller_state_dict(n, CLASSES, g)
        learned = sum(v.numel() for k, v in state.items() if k.endswith(("weight", "bias")))
        assert sum(p.numel() for p in build_model(name, CLASSES).parameters()) == learned, name
    assert sum(v.numel() for k, v in repdistiller_state_dict(3, CLASSES, g).items()
               if k.endswith(("weight", "bias"))) == 278324  # resnet20 on CIFAR-100
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=DOUBLE)
    for name in ("ResNet8", "ResNet20"):
        n = BLOCKS_PER_STAGE[name]
        state = repdistiller_state_dict(n, CLASSES, g)
        model = convert(state, name, CLASSES, "test")[0].double()
        model.load_state_dict({repdistiller_key(key): value for key, value in state.items()})  # in float64
        for training in (False, True):
            model.train(training)
            with torch.no_grad():
                ours = model(x)
            (f0, f1, f2, f3, f4), logits = repdistiller_forward(state, x, n, training)
            for a, b in zip(ours, (f1, f2, f3, f4, logits)):  # stage outputs post-ReLU, as feat[1:4]
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name


def test_initialisation_is_repdistillers():
    """Convs kaiming_normal(fan_out, relu), BN weight 1 and bias 0, fc PyTorch's default."""
    torch.manual_seed(0)
    model = build_model("ResNet56", CLASSES)
    last_conv = model.stages[2][-1].conv2.weight
    assert abs(last_conv.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.03
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    bound = 1 / math.sqrt(64)
    assert model.fc.weight.abs().max() <= bound and model.fc.weight.abs().max() > 0.95 * bound
