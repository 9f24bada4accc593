"""DKD, decoupled KD (Zhao et al. 2022), as mdistiller runs it.

With p = softmax(logits / T) and labels y: TCKD is the KL divergence between the binary
distributions (p_y, 1 - p_y) of teacher and student, NCKD the KL divergence between the
distributions over the non-target classes; loss = T^2 * (tckd_weight * TCKD +
nckd_weight * NCKD), summed over classes and averaged over the batch. Both are computed
in log space (log p_y and log(1 - p_y) from logsumexp; the non-target classes gathered
out), which equals mdistiller's form (log of the binary probabilities; the target logit
masked by subtracting 1000) wherever that one is finite, and stays finite when a softmax
saturates. The weight ramps linearly over the first `warmup_epochs` epochs as in
mdistiller, min(epoch / warmup, 1) with 1-based epochs: a pure function of the epoch,
set by start_epoch, so it resumes exactly.
"""

import torch
import torch.nn.functional as F

from .base import MethodLoss

NAME = "dkd"
VERSION = 1
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 1.0,
               "description": "Weight of the DKD loss after the warm-up: 1 as mdistiller (CE 1 + DKD)."},
    "tckd_weight": {"type": "number", "minimum": 0, "default": 1.0,
                    "description": "The paper's alpha, weight of TCKD: 1 as the paper and mdistiller."},
    "nckd_weight": {"type": "number", "minimum": 0, "default": 8.0,
                    "description": "The paper's beta, weight of NCKD: 8 as mdistiller's default and the paper's "
                                   "main CIFAR setting; mdistiller's configs for resnet56->resnet20 and "
                                   "resnet110->resnet32 use 2."},
    "temperature": {"type": "number", "exclusiveMinimum": 0, "default": 4.0,
                    "description": "Softmax temperature T (the loss is scaled by T^2): 4 as mdistiller."},
    "warmup_epochs": {"type": "integer", "minimum": 0, "default": 20,
                      "description": "The weight ramps linearly to its full value over this many epochs "
                                     "(epoch e of 1..n gets min(e / warmup, 1)): 20 as mdistiller. 0: no ramp."},
}


def binary_log_probs(z, target_mask):
    """log (p_target, p_rest) per sample, from logsumexp: finite even when p_target rounds to 1."""
    total = torch.logsumexp(z, 1)
    target = (z * target_mask).sum(1)
    rest = torch.logsumexp(z.masked_fill(target_mask.bool(), float("-inf")), 1)
    return torch.stack([target - total, rest - total], 1)


def non_target_columns(labels, num_classes):
    """(B, C - 1) column indices of each row's non-target classes, in class order. Gathering
    them replaces a boolean mask, which would read its count back to the host (a GPU sync)."""
    columns = torch.arange(num_classes - 1, device=labels.device).unsqueeze(0)
    return columns + (columns >= labels.unsqueeze(1)).long()


def kl_batchmean(log_p_student, log_p_teacher):
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.temperature = settings["weight"], settings["temperature"]
        self.tckd_weight, self.nckd_weight = settings["tckd_weight"], settings["nckd_weight"]
        self.warmup_epochs = settings["warmup_epochs"]
        self.start_epoch(0)

    def start_epoch(self, epoch):
        self.ramp = min((epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0

    def terms(self, student_out, teacher_out, labels, index):
        T = self.temperature
        z_s, z_t = student_out[-1] / T, teacher_out[-1].detach() / T
        c = z_s.shape[1]
        target_mask = F.one_hot(labels, c).to(z_s.dtype)
        tckd = kl_batchmean(binary_log_probs(z_s, target_mask), binary_log_probs(z_t, target_mask))
        others = non_target_columns(labels, c)
        nckd = kl_batchmean(F.log_softmax(z_s.gather(1, others), 1), F.log_softmax(z_t.gather(1, others), 1))
        scale = self.weight * self.ramp * T * T
        return {"dkd_tckd": scale * self.tckd_weight * tckd, "dkd_nckd": scale * self.nckd_weight * nckd}
