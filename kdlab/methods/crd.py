"""CRD (Tian et al. 2020): contrastive representation distillation, as RepDistiller's code.

Student and teacher embeddings (emb) pass through learned linear maps to feat_dim and are
L2-normalised. Two memory banks hold a momentum average (nce_m) of every training sample's
student and teacher embedding. For each sample, its positive (its own index; in "relax"
mode a random sample of its class) and nce_k negatives drawn without replacement from the
other classes are scored exp(v . m / nce_t) / Z, with the constant Z estimated from the
first batch; the NCE loss runs on both sides (student anchor over the teacher bank and
teacher anchor over the student bank).

State: both banks and the two Z are buffers, so they are in the checkpoint. The negatives
are drawn on the device from a generator seeded by (run seed, epoch, call within the
epoch), so a run resumed at an epoch boundary draws exactly what the uninterrupted run drew.
Memory: 2 banks x N x feat_dim fp32 (CIFAR-100: 2 x 50000 x 128 x 4 B = 51 MB), plus per
step a B x N score matrix per side (64 x 50000 fp32 = 12.8 MB) instead of RepDistiller's
gathered B x (nce_k + 1) x feat_dim bank rows (537 MB per side at nce_k 16384).
"""

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import EMBEDDING_DIM
from .base import MethodLoss

NAME = "crd"
VERSION = 1
NEEDS_TEACHER = True
TEACHER_OUTPUTS = "logits+embedding"  # reads only teacher_out[-2:], so the teacher cache serves it
STUDENT_OUTPUTS = "logits+embedding"  # reads only student_out[-2:]: no gradient to its features
SETTINGS = {
    "weight": {"type": "number", "minimum": 0, "default": 0.8,
               "description": "Weight of the CRD loss; 0.8 as RepDistiller (-b 0.8 with CE 1: the additive "
                              "recipe ce_weight 1, kd_weight 0)."},
    "feat_dim": {"type": "integer", "minimum": 1, "maximum": 65536, "default": 128,
                 "description": "Dimension of the learned embeddings and of the memory banks; 128 as RepDistiller."},
    "nce_k": {"type": "integer", "minimum": 1, "default": 16384,
              "description": "Negatives per sample, drawn without replacement from the other classes; 16384 as "
                             "RepDistiller. Clamped (with a log line) to the smallest other-class pool."},
    "nce_t": {"type": "number", "exclusiveMinimum": 0, "default": 0.07,
              "description": "Temperature of the scores exp(v . m / nce_t); 0.07 as RepDistiller."},
    "nce_m": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
              "description": "Momentum of the memory-bank update; 0.5 as RepDistiller."},
    "mode": {"type": "string", "enum": ["exact", "relax"], "default": "exact",
             "description": "'exact' (RepDistiller's default, used for its tables): the positive is the sample "
                            "itself; 'relax': a random training sample of the same class."},
}
EPS = 1e-7  # RepDistiller's epsilon in the NCE ratios


def draw_seed(seed, epoch, step):
    """A 64-bit generator seed for one batch's draw, independent of the loaders' streams."""
    return int.from_bytes(hashlib.sha256(f"crd {seed} {epoch} {step}".encode()).digest()[:8], "little")


def nce_loss(scores, noise):
    """RepDistiller's ContrastLoss: column 0 holds the positive's score, the rest the negatives'.

    noise = m * Pn, with m negatives and Pn = 1 / N the uniform noise probability.
    """
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + EPS))
    log_d0 = torch.log(noise / (negatives + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        labels = torch.as_tensor(run["train_labels"], dtype=torch.int64)  # build_loss adds them to the run
        n, dim = len(labels), settings["feat_dim"]
        smallest_pool = n - int(torch.bincount(labels).max())
        self.k = min(settings["nce_k"], smallest_pool)
        if self.k < 1:
            raise ValueError("crd: the training set must hold samples of at least two classes")
        if self.k < settings["nce_k"]:
            print(f"crd: nce_k {settings['nce_k']} is more than the {smallest_pool} training samples outside the "
                  f"largest class; drawing {self.k} negatives per sample", flush=True)
        self.weight, self.temperature, self.momentum = settings["weight"], settings["nce_t"], settings["nce_m"]
        self.relax, self.seed = settings["mode"] == "relax", run["seed"]
        self.embed_s = nn.Linear(EMBEDDING_DIM, dim)
        self.embed_t = nn.Linear(EMBEDDING_DIM, dim)
        # RepDistiller's initialisation: uniform in +-1/sqrt(dim/3), rows of norm about 1.
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(n, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); negative: not estimated yet
        self.register_buffer("dataset_labels", labels, persistent=False)
        self.start_epoch(0)

    def start_epoch(self, epoch):
        self.epoch, self.step = epoch, 0

    def sample(self, index, labels):
        """(B, 1 + k) dataset indices: each sample's positive, then its negatives."""
        same_class = self.dataset_labels.unsqueeze(0) == labels.unsqueeze(1)
        keys = self.draw_keys(same_class.shape, index.device)
        negatives = keys.masked_fill(same_class, 2.0).topk(self.k, dim=1, largest=False).indices
        positive = keys.masked_fill(~same_class, 2.0).argmin(1) if self.relax else index
        return torch.cat([positive.unsqueeze(1), negatives], dim=1)

    def draw_keys(self, shape, device):
        """Uniform keys from a generator seeded on the host by (run seed, epoch, step): nothing is
        read from the device. Float64: ties among N keys are practically impossible, so the k
        smallest are unique."""
        g = torch.Generator(device=device).manual_seed(draw_seed(self.seed, self.epoch, self.step))
        return torch.rand(shape, generator=g, dtype=torch.float64, device=device)

    def scores(self, v, memory, contrast, z):
        """exp(v . m / nce_t) / Z for the sampled bank rows, and Z (estimated here if z < 0)."""
        # All N dot products, then the sampled ones: gather's backward adds into distinct
        # slots (no index repeats within a row), so it is deterministic on the GPU too.
        out = torch.exp(torch.gather(v @ memory.t(), 1, contrast) / self.temperature)
        z = torch.where(z < 0, out.detach().mean() * memory.shape[0], z)
        return out / z, z

    def updated(self, memory, v, index):
        """The bank with the rows of `index` moved towards v and renormalised (out of place:
        the scores' graph still holds the old bank)."""
        rows = memory[index] * self.momentum + v * (1 - self.momentum)
        return memory.index_copy(0, index, rows / rows.pow(2).sum(1, keepdim=True).sqrt())

    def terms(self, student_out, teacher_out, labels, index):
        if index is None:
            raise ValueError("crd needs each sample's dataset index (the training loop passes it)")
        v_s = F.normalize(self.embed_s(student_out[-2]), dim=1)
        v_t = F.normalize(self.embed_t(teacher_out[-2]), dim=1)
        contrast = self.sample(index, labels)
        noise = self.k / self.memory_s.shape[0]
        scores_s, z_s = self.scores(v_s, self.memory_t, contrast, self.z[0])
        scores_t, z_t = self.scores(v_t, self.memory_s, contrast, self.z[1])
        loss = nce_loss(scores_s, noise) + nce_loss(scores_t, noise)
        if self.training:
            self.z = torch.stack([z_s, z_t])
            self.memory_s = self.updated(self.memory_s, v_s.detach(), index)
            self.memory_t = self.updated(self.memory_t, v_t.detach(), index)
            self.step += 1
        return {"crd": self.weight * loss}
