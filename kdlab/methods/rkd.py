"""RKD (Park et al. 2019): distance and angle relations of the pooled embeddings.

Numerics: the distance of a point to itself is not differentiable (sqrt at 0), so
squared distances are clamped before the square root and the diagonal is masked out
without letting gradient through. Embeddings are first divided by their (detached)
largest magnitude: both losses are scale-invariant, and this keeps squared distances
far from float32 overflow for any input. A batch of one sample has no pairs: the
losses are zero (with a graph, so backward still works), not NaN.
"""

import torch
import torch.nn.functional as F

from .base import MethodLoss, scale_free

NAME = "rkd"
VERSION = 2  # 1: the earlier toolbox's pairwise-cosine "angle" and weights 25/50
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "distance_weight": {"type": "number", "minimum": 0, "default": 1.0,
                        "description": "Weight of the distance loss. The paper uses 25 with CE at weight 1; "
                                       "with the alpha blend that overwhelms CE, so the group settled on 1."},
    "angle_weight": {"type": "number", "minimum": 0, "default": 2.0,
                     "description": "Weight of the angle loss. The paper uses 50; the group settled on 2."},
    "angle": {"type": "string", "enum": ["triplet", "pairwise_cosine"], "default": "triplet",
              "description": "'triplet' is the paper's angle (cosine at i between e_j - e_i and e_k - e_i, "
                             "B^3 values); 'pairwise_cosine' is a cheaper B^2 variant that is NOT the paper's."},
}
EPS = 1e-12


def normalised_distances(e):
    """Pairwise Euclidean distances divided by the mean off-diagonal distance."""
    b = e.shape[0]
    squared = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1)  # differences, not |a|^2+|b|^2-2ab
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=e.device)
    d = squared.clamp(min=EPS).sqrt() * off_diagonal
    # The mean over the b(b-1) off-diagonal entries as a sum (the diagonal is 0): a boolean
    # mask would read its count back to the host, a sync on the GPU.
    return d / (d.sum() / (b * (b - 1))).clamp(min=EPS)


def triplet_cosines(e):
    """cos[i, j, k]: cosine of the angle at e_i between e_j - e_i and e_k - e_i (0 when j or k is i)."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[i, j] = e_j - e_i
    unit = diff / diff.pow(2).sum(-1, keepdim=True).clamp(min=EPS).sqrt()
    return torch.bmm(unit, unit.transpose(1, 2))


def pairwise_cosines(e):
    unit = F.normalize(e, dim=1, eps=EPS)
    return unit @ unit.t()


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.distance_weight, self.angle_weight = settings["distance_weight"], settings["angle_weight"]
        self.angles = triplet_cosines if settings["angle"] == "triplet" else pairwise_cosines

    def terms(self, student_out, teacher_out, labels, index):
        s, t = scale_free(student_out[-2]), scale_free(teacher_out[-2]).detach()
        if s.shape[0] < 2:
            zero = s.sum() * 0.0
            return {"rkd_distance": zero, "rkd_angle": zero}
        distance = F.smooth_l1_loss(normalised_distances(s), normalised_distances(t), beta=1.0)
        angle = F.smooth_l1_loss(self.angles(s), self.angles(t), beta=1.0)
        return {"rkd_distance": self.distance_weight * distance, "rkd_angle": self.angle_weight * angle}
