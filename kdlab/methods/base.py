"""The one shared piece of the method interface."""

import torch
from torch import nn


class MethodLoss(nn.Module):
    """Computes a method's named loss terms in float32 (float64 if given float64) with autocast off.

    fp16 rounds small epsilons to zero, cancels in pairwise distances and overflows at
    65504; the method losses are cheap next to the network, so they always run in fp32.
    Subclasses implement terms(student_out, teacher_out, labels, index) -> {name: scalar};
    `index` holds each sample's dataset index (int64, on the device) during training and
    is None where there is none (tests may pass None).
    """

    def forward(self, student_out, teacher_out, labels, index=None):
        device_type = labels.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            student_out = tuple(at_least_float32(x) for x in student_out)
            teacher_out = tuple(at_least_float32(x) for x in teacher_out) if teacher_out is not None else None
            return self.terms(student_out, teacher_out, labels, index)

    def terms(self, student_out, teacher_out, labels, index):
        raise NotImplementedError

    def start_epoch(self, epoch):
        """Called before each training epoch (0-based), also after a resume: for schedules."""


def scale_free(f):
    """f divided by its (detached) largest magnitude: for losses invariant to the scale of f,
    the same value and gradient, and squares or powers of f neither overflow nor underflow."""
    return f / f.detach().abs().amax().clamp(min=1e-12)


def at_least_float32(x):
    """fp16/bf16 -> float32; float32 and float64 (the reference tests' precision) stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def stages_setting(default, source):
    """The `stages` setting of the methods that distil stage outputs."""
    return {"type": "array", "items": {"type": "integer", "enum": [0, 1, 2]}, "minItems": 1, "uniqueItems": True,
            "default": default,
            "description": "Stages distilled, each student stage onto the same teacher stage (0: 16x32x32, "
                           f"1: 32x16x16, 2: 64x8x8); the terms are summed. {source}"}
