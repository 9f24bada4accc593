"""VID, variational information distillation (Ahn et al. 2019), the authors' code as in RepDistiller.

Per stage (student and teacher maps have the same size): a regressor of three
1x1 convolutions without bias (C_s -> C_t -> C_t -> C_t, ReLU between) predicts the
mean of the teacher's stage output; a learned per-channel variance softplus(w) + 1e-5,
w initialised so that it starts at `init_variance`; loss = mean over samples, channels
and positions of 0.5 * ((mu - f_t)^2 / var + log var), summed over the stages.
Regressors and variances are parameters of this loss: they train with the student and
are in the checkpoint.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import STAGE_CHANNELS
from .base import MethodLoss, stages_setting

NAME = "vid"
VERSION = 1
NEEDS_TEACHER = True
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 1.0,
               "description": "Weight of the summed stage losses: 1 as RepDistiller/CRD (CE 1 + 1 VID)."},
    "init_variance": {"type": "number", "minimum": 0.001, "default": 5.0,
                      "description": "Initial per-channel variance: 5 as the authors' code and RepDistiller."},
    "stages": stages_setting([0, 1, 2], "All three, as RepDistiller and the CRD paper."),
}
VARIANCE_FLOOR = 1e-5  # the authors' eps


class StageVID(nn.Module):
    def __init__(self, student_channels, teacher_channels, init_variance):
        super().__init__()
        conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1, bias=False)  # noqa: E731
        self.regressor = nn.Sequential(conv(student_channels, teacher_channels), nn.ReLU(),
                                       conv(teacher_channels, teacher_channels), nn.ReLU(),
                                       conv(teacher_channels, teacher_channels))
        # softplus^-1(init_variance - floor), so that softplus(w) + floor starts at init_variance
        self.raw_variance = nn.Parameter(torch.full((teacher_channels,),
                                                    math.log(math.expm1(init_variance - VARIANCE_FLOOR))))

    def forward(self, f_s, f_t):
        mean = self.regressor(f_s)
        variance = (F.softplus(self.raw_variance) + VARIANCE_FLOOR).view(1, -1, 1, 1)
        return (0.5 * ((mean - f_t).pow(2) / variance + variance.log())).mean()


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.stages = settings["weight"], settings["stages"]
        self.vid = nn.ModuleDict({str(stage): StageVID(STAGE_CHANNELS[stage], STAGE_CHANNELS[stage],
                                                       settings["init_variance"]) for stage in self.stages})

    def terms(self, student_out, teacher_out, labels, index):
        total = sum(self.vid[str(stage)](student_out[stage], teacher_out[stage].detach()) for stage in self.stages)
        return {"vid": self.weight * total}
