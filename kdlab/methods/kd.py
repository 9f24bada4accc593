"""Hinton et al. 2015: KL divergence between temperature-softened logits."""

import torch.nn.functional as F

from .base import MethodLoss

NAME = "kd"
VERSION = 1
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "temperature": {"type": "number", "minimum": 0.5, "maximum": 100, "default": 4.0,
                    "description": "Softmax temperature T in [0.5, 100]; the loss is scaled by T^2, so a tiny T "
                                   "would switch the KD term off (Hinton et al. 2015). "
                                   "4 as in the CRD/RepDistiller CIFAR recipe."},
}


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.temperature = settings["temperature"]

    def terms(self, student_out, teacher_out, labels, index):
        T = self.temperature
        # KL(p_t || p_s), summed over classes and averaged over the batch ("batchmean").
        kl = F.kl_div(F.log_softmax(student_out[-1] / T, dim=1), F.log_softmax(teacher_out[-1] / T, dim=1),
                      reduction="batchmean", log_target=True)
        return {"kd": T * T * kl}
