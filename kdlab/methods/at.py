"""AT, attention transfer (Zagoruyko & Komodakis 2017), as RepDistiller runs it.

The attention map of a stage output f (B, C, H, W) is mean_c f^p flattened over H*W and
L2-normalised per sample; the loss per stage is the mean over samples and positions of
the squared difference of the student's and the teacher's maps, summed over the stages
(every CIFAR ResNet here has the same stage sizes, so RepDistiller's pooling of the
larger map never applies). The map is
invariant to the scale of f, so f is first divided by its (detached) largest magnitude:
the same value and gradient, and f^p can neither overflow nor underflow in float32.
"""

import torch.nn.functional as F

from .base import MethodLoss, scale_free, stages_setting

NAME = "at"
VERSION = 1
NEEDS_TEACHER = True
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 1000.0,
               "description": "Weight of the summed stage losses: 1000 as RepDistiller/CRD (CE 1 + 1000 AT). "
                              "The authors' code writes beta/2 * sum with beta 1000, i.e. 500."},
    "p": {"type": "integer", "minimum": 1, "default": 2,
          "description": "Power p of the attention map mean_c f^p: 2 as the authors and RepDistiller."},
    "stages": stages_setting([0, 1, 2], "All three, as RepDistiller and the CRD paper."),
}


def attention_map(f, p):
    return F.normalize(scale_free(f).pow(p).mean(1).flatten(1), dim=1)


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.p, self.stages = settings["weight"], settings["p"], settings["stages"]

    def terms(self, student_out, teacher_out, labels, index):
        total = 0.0
        for stage in self.stages:
            f_s, f_t = student_out[stage], teacher_out[stage]
            total = total + (attention_map(f_s, self.p) - attention_map(f_t, self.p).detach()).pow(2).mean()
        return {"at": self.weight * total}
