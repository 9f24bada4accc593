"""DIST (Huang et al. 2022), the authors' code.

With p = softmax(logits / T): the inter-class relation is 1 - mean over samples of the
Pearson correlation of the student's and the teacher's class distributions; the
intra-class relation the same over classes (each class's probabilities across the
batch); loss = T^2 * (inter_weight * inter + intra_weight * intra). Pearson correlation
is the cosine of the mean-centred vectors, (a . b) / (|a| |b| + 1e-8) as the authors.
"""

import torch

from .base import MethodLoss

NAME = "dist"
VERSION = 1
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 1.0,
               "description": "Weight of the DIST loss: 1, with beta = gamma = 2 below. The authors' CIFAR-100 "
                              "recipe (DIST_KD's configs/strategies/distill/dist_cifar.yaml: kd dist_t4, "
                              "kd_loss_weight 2, ori_loss_weight 1) is CE + 2 * DIST(beta 1, gamma 1, tau 4), "
                              "the same loss as CE + 1 * DIST(beta 2, gamma 2, tau 4)."},
    "inter_weight": {"type": "number", "minimum": 0, "default": 2.0,
                     "description": "The paper's beta, weight of the inter-class relation: 2, i.e. the authors' "
                                    "CIFAR-100 kd_loss_weight 2 times their beta 1 (see weight)."},
    "intra_weight": {"type": "number", "minimum": 0, "default": 2.0,
                     "description": "The paper's gamma, weight of the intra-class relation: 2, i.e. the authors' "
                                    "CIFAR-100 kd_loss_weight 2 times their gamma 1 (see weight)."},
    "temperature": {"type": "number", "exclusiveMinimum": 0, "default": 4.0,
                    "description": "Softmax temperature tau (the loss is scaled by tau^2): 4 as the authors' "
                                   "CIFAR-100 config (kd: dist_t4; their code's default 1 is the ImageNet setting)."},
}
EPS = 1e-8  # the authors'


def mean_pearson(a, b):
    """Mean over rows of the Pearson correlation between a's and b's rows."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1) + EPS)).mean()


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.temperature = settings["weight"], settings["temperature"]
        self.inter_weight, self.intra_weight = settings["inter_weight"], settings["intra_weight"]

    def terms(self, student_out, teacher_out, labels, index):
        T = self.temperature
        p_s, p_t = torch.softmax(student_out[-1] / T, 1), torch.softmax(teacher_out[-1].detach() / T, 1)
        scale = self.weight * T * T
        return {"dist_inter": scale * self.inter_weight * (1 - mean_pearson(p_s, p_t)),
                "dist_intra": scale * self.intra_weight * (1 - mean_pearson(p_s.t(), p_t.t()))}
