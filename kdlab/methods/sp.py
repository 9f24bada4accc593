"""SP, similarity-preserving KD (Tung & Mori 2019), as RepDistiller runs it.

Per stage: G = F F^T (B x B) of the stage output flattened per sample, each row
L2-normalised; loss = ||G_t - G_s||_F^2 / B^2, summed over the stages. G's rows are
invariant to the scale of F, so F is first divided by its (detached) largest magnitude:
the same value and gradient, and no overflow of F F^T in float32.
"""

import torch.nn.functional as F

from .base import MethodLoss, scale_free, stages_setting

NAME = "sp"
VERSION = 1
NEEDS_TEACHER = True
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 3000.0,
               "description": "Weight of the SP loss: 3000 as RepDistiller/CRD (CE 1 + 3000 SP)."},
    "stages": stages_setting([2], "The last stage (64x8x8), as RepDistiller and the CRD paper."),
}


def similarity(f):
    f = scale_free(f.flatten(1))
    return F.normalize(f @ f.t(), dim=1)


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.stages = settings["weight"], settings["stages"]

    def terms(self, student_out, teacher_out, labels, index):
        total = 0.0
        for stage in self.stages:
            g_s, g_t = similarity(student_out[stage]), similarity(teacher_out[stage]).detach()
            total = total + (g_t - g_s).pow(2).sum() / g_s.shape[0] ** 2
        return {"sp": self.weight * total}
