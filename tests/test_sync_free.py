"""No host synchronisation in what runs every training step: each method's loss terms and
their backward (kdlab/methods, kdlab/loss.py) and the teacher-cache lookup.

They run on PyTorch's meta device: tensors with shapes and dtypes but no data. Whatever
reads a device value on the host (.item(), float(t), `if t:`, .tolist(), .cpu(), .numpy(),
boolean-mask indexing, nonzero, unique, masked_select, repeat_interleave without
output_size) raises there, and on a GPU each of these is a sync that stalls the launch
queue. Not caught: a sync hidden inside a CUDA kernel whose meta version has a static
shape. torch.compile(fullgraph=True) is no such detector in torch 2.14: under fullgraph,
dynamo captures .item() and boolean masks into the graph instead of refusing them.
"""

import pytest
import torch

from kdlab.loss import Additive
from kdlab.methods import METHODS
from kdlab.methods.base import MethodLoss
from kdlab.teacher_cache import NUM_VIEWS, TeacherCache, save

from conftest import every_method_loss

SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64,), (5,)]  # ResNet8 outputs, 5 classes
BATCH = 4


def outputs(requires_grad=False, device="meta"):
    return tuple(torch.randn(BATCH, *s, device=device, requires_grad=requires_grad) for s in SHAPES)


def step_on_meta(loss):
    """One step's loss terms and backward with data-free tensors; returns the terms.

    Calls terms() directly: forward() only adds autocast (which has no meta device) and a
    dtype promotion, neither of which reads data."""
    loss.to("meta").train()
    loss.start_epoch(0)
    labels = index = torch.zeros(BATCH, dtype=torch.int64, device="meta")
    student_out = outputs(requires_grad=True)
    terms = loss.terms(student_out, outputs(), labels, index)
    sum(terms.values()).backward()
    assert any(s.grad is not None for s in student_out)
    return terms


def method_loss(name, tmp_path):
    loss = Additive(every_method_loss(name, tmp_path), {"kd_weight": 1.0, "kd_temperature": 4.0}, own_kd=name == "kd")
    if name == "crd":
        # The one exception: CRD draws its negatives' keys from a torch.Generator seeded on the
        # host each step (draw_keys reads nothing from the device, so no sync), and the meta
        # device has no generator (nor does dynamo trace creating one). Everything else in CRD
        # (sampling, scores, bank update) runs.
        loss.method.draw_keys = lambda shape, device: torch.rand(shape, dtype=torch.float64, device=device)
    return loss


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_step_reads_nothing_back_to_the_host(name, tmp_path):
    terms = step_on_meta(method_loss(name, tmp_path))
    assert "kd" in terms or name == "kd"
    assert all(v.device.type == "meta" and v.dim() == 0 for v in terms.values())


class Planted(MethodLoss):
    def __init__(self, host_read):
        super().__init__()
        self.host_read = host_read

    def terms(self, student_out, teacher_out, labels, index):
        return {"planted": self.host_read(student_out[-2] - teacher_out[-2])}


@pytest.mark.parametrize("host_read", [
    lambda d: d.pow(2).mean() * d.abs().max().item(),
    lambda d: d[d > 0].mean(),  # boolean mask: nonzero inside
    lambda d: d.pow(2).mean() if d.sum() > 0 else d.abs().mean(),
    lambda d: d.pow(2).mean() * float(d.detach().norm()),
    lambda d: d.pow(2).mean() * sum(d.sum(1).tolist()),
    lambda d: d.flatten()[d.flatten().nonzero()].mean(),
    lambda d: d.cpu().pow(2).mean(),
], ids=["item", "boolean_mask", "if_tensor", "float", "tolist", "nonzero", "cpu"])
def test_the_check_catches_a_planted_host_read(host_read):
    loss = Planted(host_read)
    loss.terms(outputs(device="cpu"), outputs(device="cpu"), None, None)  # fine on real tensors
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        step_on_meta(loss)


def test_teacher_cache_lookup_reads_nothing_back_to_the_host(tmp_path):
    key = {"num_classes": 5}
    save(tmp_path / "cache.pth", {"key": key, "outputs": torch.zeros(8, NUM_VIEWS, 5 + 64, dtype=torch.float16)})
    cache = TeacherCache(tmp_path / "cache.pth", key, "cpu")
    cache.outputs = cache.outputs.to("meta")
    embedding, logits = cache(torch.zeros(BATCH, 4, dtype=torch.int64, device="meta"))
    assert embedding.shape == (BATCH, 64) and logits.shape == (BATCH, 5) and logits.dtype == torch.float32
