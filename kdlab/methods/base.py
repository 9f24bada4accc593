"""The one shared piece of the method interface."""

import torch
from torch import nn


class MethodLoss(nn.Module):
    """Computes a method's named loss terms in float32 with autocast off.

    fp16 rounds small epsilons to zero, cancels in pairwise distances and overflows at
    65504; the method losses are cheap next to the network, so they always run in fp32.
    Subclasses implement terms(student_out, teacher_out, labels, index) -> {name: scalar};
    `index` holds each sample's dataset index (int64, on the device) during training and
    is None where there is none (gradient-share probes use the batch's, tests may pass None).
    Training always computes in float32; tests set compute_dtype to float64 (and call
    .double()) to compare the same code path with a float64 reference.
    """

    compute_dtype = torch.float32

    def forward(self, student_out, teacher_out, labels, index=None):
        device_type = labels.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            student_out = tuple(x.to(self.compute_dtype) for x in student_out)
            teacher_out = tuple(x.to(self.compute_dtype) for x in teacher_out) if teacher_out is not None else None
            return self.terms(student_out, teacher_out, labels, index)

    def terms(self, student_out, teacher_out, labels, index):
        raise NotImplementedError

    def start_epoch(self, epoch):
        """Called before each training epoch (0-based), also after a resume: for schedules."""


def no_check(settings, student, teacher):
    """For methods that work with any student/teacher pair."""
