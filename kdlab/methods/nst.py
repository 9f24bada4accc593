"""NST, neuron selectivity transfer (Huang & Wang 2017), as RepDistiller runs it.

Per stage (student and teacher maps have the same size): each channel's map is
flattened and L2-normalised over positions; with the polynomial kernel
k(x, y) = (x . y)^2 between channel vectors, the squared MMD
mean k(t, t) (no gradient) + mean k(s, s) - 2 mean k(s, t), summed over the stages.
The normalised maps do not depend on the scale of f, so f is first divided by its
(detached) largest magnitude: the same value and gradient, no underflow in float32.
The MMD compares two sets of channel vectors: it needs the same number of positions
(the pooling gives that), not the same number of channels.
"""

import torch.nn.functional as F

from .base import MethodLoss, scale_free, stages_setting

NAME = "nst"
VERSION = 1
NEEDS_TEACHER = True
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 50.0,
               "description": "Weight of the summed stage losses: 50 as RepDistiller/CRD (CE 1 + 50 NST)."},
    "stages": stages_setting([0, 1, 2], "All three, as RepDistiller and the CRD paper."),
}


def channel_maps(f):
    return F.normalize(scale_free(f).flatten(2), dim=2)  # (B, C, H*W), unit norm per channel


def polynomial_kernel_mean(a, b):
    return (a @ b.transpose(1, 2)).pow(2).mean()


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.stages = settings["weight"], settings["stages"]

    def terms(self, student_out, teacher_out, labels, index):
        total = 0.0
        for stage in self.stages:
            f_s, f_t = student_out[stage], teacher_out[stage]
            s, t = channel_maps(f_s), channel_maps(f_t).detach()
            total = total + (polynomial_kernel_mean(t, t) + polynomial_kernel_mean(s, s)
                             - 2 * polynomial_kernel_mean(s, t))
        return {"nst": self.weight * total}
