"""CC, correlation congruence (Peng et al. 2019), in RepDistiller's form (the authors' code).

Both pooled embeddings pass through a learned linear embedding (to 128-d; the teacher's
embedding is trained too); with d = |e_s - e_t|, loss = mean over consecutive sample
pairs i, i+1 of sum_k d[i, k] * d[i+1, k]. The embeddings are parameters of this loss,
so they train with the student and are in the checkpoint. A batch of one sample has no
pair: the loss is zero (with a graph), not NaN.
"""

import torch.nn.functional as F
from torch import nn

from ..models import EMBEDDING_DIM
from .base import MethodLoss

NAME = "cc"
VERSION = 1
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 0.02,
               "description": "Weight of the CC loss: 0.02 as RepDistiller/CRD (CE 1 + 0.02 CC)."},
    "embed_dim": {"type": "integer", "minimum": 1, "maximum": 65536, "default": 128,
                  "description": "Output size of the two learned linear embeddings: 128 as RepDistiller (feat_dim)."},
    "normalize": {"type": "boolean", "default": False,
                  "description": "L2-normalise the embeddings: false as RepDistiller's code (LinearEmbed, no "
                                 "normalisation); true is the reading of ../shared/reference/methods.md."},
}


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.normalize = settings["weight"], settings["normalize"]
        self.embed_s = nn.Linear(EMBEDDING_DIM, settings["embed_dim"])
        self.embed_t = nn.Linear(EMBEDDING_DIM, settings["embed_dim"])

    def terms(self, student_out, teacher_out, labels, index):
        e_s, e_t = self.embed_s(student_out[-2]), self.embed_t(teacher_out[-2].detach())
        if self.normalize:
            e_s, e_t = F.normalize(e_s, dim=1), F.normalize(e_t, dim=1)
        d = (e_s - e_t).abs()
        if d.shape[0] < 2:
            return {"cc": d.sum() * 0.0}
        return {"cc": self.weight * (d[:-1] * d[1:]).sum(1).mean()}
