"""PKT, probabilistic knowledge transfer (Passalis & Tefas 2018), the authors' code as in RepDistiller.

On the pooled embeddings: each vector divided by (its norm + 1e-7); cosine similarities
mapped to [0, 1] by (c + 1) / 2; each row divided by its sum (a conditional probability
over the batch); loss = mean over all B*B entries of p_t * log((p_t + 1e-7) / (p_s + 1e-7)).
The norm is computed without overflow or underflow (each vector scaled by its detached
largest magnitude first), so all-zero or tiny embeddings keep finite gradients.
"""

import torch

from .base import MethodLoss

NAME = "pkt"
VERSION = 1
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 30000.0,
               "description": "Weight of the PKT loss: 30000 as RepDistiller/CRD (CE 1 + 30000 PKT)."},
}
EPS = 1e-7  # the authors'
TINY = 1e-30


def safe_norm(x):
    """Row norms of x, exact in value and gradient, without overflow or underflow of x^2."""
    scale = x.detach().abs().amax(1, keepdim=True).clamp(min=TINY)
    return scale * (x / scale).pow(2).sum(1, keepdim=True).clamp(min=TINY).sqrt()


def conditional_probabilities(e):
    unit = e / (safe_norm(e) + EPS)
    similarity = ((unit @ unit.t() + 1.0) / 2.0).clamp(min=0)  # a cosine may round below -1
    return similarity / similarity.sum(1, keepdim=True)


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight = settings["weight"]

    def terms(self, student_out, teacher_out, labels, index):
        p_s, p_t = conditional_probabilities(student_out[-2]), conditional_probabilities(teacher_out[-2]).detach()
        loss = (p_t * (torch.log(p_t + EPS) - torch.log(p_s + EPS))).mean()
        return {"pkt": self.weight * loss}
