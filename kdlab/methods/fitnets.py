"""FitNets (Romero et al. 2015): regress a student stage onto a teacher stage.

Trained jointly with the student in one stage, as the CIFAR anchors (RepDistiller,
CRD) do. The connector is the anchors' conv + BN + ReLU, chosen by the ratio of the
two feature maps' sizes.
"""

import torch.nn.functional as F
from torch import nn

from ..models import STAGE_CHANNELS, STAGE_SIZES
from .base import MethodLoss

NAME = "fitnets"
VERSION = 1
NEEDS_TEACHER = True
SETTINGS = {
    "guided_layer": {"type": "integer", "enum": [0, 1, 2], "default": 0,
                     "description": "Student stage regressed onto the hint (0: 16x32x32, 1: 32x16x16, "
                                    "2: 64x8x8). 0 is the group's choice: the classic thin-deep guided layer."},
    "hint_layer": {"type": "integer", "enum": [0, 1, 2], "default": 1,
                   "description": "Teacher stage used as the hint. 1 (32x16x16) is the group's choice; "
                                  "the connector maps 32x32 onto 16x16 with a stride-2 conv."},
    "weight": {"type": "number", "minimum": 0, "default": 100.0,
               "description": "Weight of the hint MSE inside the method's loss. 100 as in RepDistiller/CRD "
                              "(CE 1 + 100 MSE: the additive recipe ce_weight 1, kd_weight 0)."},
}


def connector_kind(student_size, teacher_size):
    if student_size == 2 * teacher_size:
        return "conv3x3_stride2"
    if 2 * student_size == teacher_size:
        return "deconv4x4_stride2"
    if student_size == teacher_size:
        return "conv1x1"
    return None


def check(settings):
    s_size, t_size = STAGE_SIZES[settings["guided_layer"]], STAGE_SIZES[settings["hint_layer"]]
    if connector_kind(s_size, t_size) is None:
        raise ValueError(
            f"fitnets: guided_layer {settings['guided_layer']} ({s_size}x{s_size}) cannot be mapped onto "
            f"hint_layer {settings['hint_layer']} ({t_size}x{t_size}); the connector supports maps of "
            f"equal size, twice or half the hint's size")


def make_connector(in_channels, out_channels, kind):
    conv = {
        "conv3x3_stride2": lambda: nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        "deconv4x4_stride2": lambda: nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        "conv1x1": lambda: nn.Conv2d(in_channels, out_channels, 1, bias=False),
    }[kind]()
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        check(settings)
        self.guided, self.hint, self.weight = settings["guided_layer"], settings["hint_layer"], settings["weight"]
        kind = connector_kind(STAGE_SIZES[self.guided], STAGE_SIZES[self.hint])
        self.connector = make_connector(STAGE_CHANNELS[self.guided], STAGE_CHANNELS[self.hint], kind)

    def terms(self, student_out, teacher_out, labels, index):
        regressed = self.connector(student_out[self.guided])
        return {"fitnets_hint": self.weight * F.mse_loss(regressed, teacher_out[self.hint])}
