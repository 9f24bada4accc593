"""Factor Transfer (Kim et al. 2018), in two stages.

Stage 1 (`kdlab pretrain-paraphraser`, kdlab/pretrain.py) trains a paraphraser
(autoencoder) on the frozen teacher's last-stage features and saves paraphraser.pth.
Stage 2 (this loss) trains a translator jointly with the student; the paraphraser
stays frozen in eval mode. Factors are encoder outputs, flattened and L2-normalised
per sample; the loss is their mean absolute difference (the authors' code; RepDistiller's
channel-averaged factor is the setting factor: channel_mean_sq).
"""

from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..models import STAGE_CHANNELS
from ..runio import UnreadableFile, file_sha256, load_checked
from .base import MethodLoss

NAME = "ft"
VERSION = 1
NEEDS_TEACHER = True
SETTINGS = {
    "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 4, "default": 0.5,
             "description": "Paraphrase rate k: factors have k*64 channels. 0.5 as in the authors' CIFAR code."},
    "weight": {"type": "number", "minimum": 0, "default": 500.0,
               "description": "Weight (beta) of the factor L1 loss; 500 as the authors (with CE 1: the additive "
                              "recipe ce_weight 1, kd_weight 0). Large because the mean runs over C*H*W values."},
    "factor": {"type": "string", "enum": ["flatten", "channel_mean_sq"], "default": "flatten",
               "description": "'flatten': the encoder output flattened (C*H*W) and L2-normalised, as the authors; "
                              "'channel_mean_sq': the squared output averaged over channels (H*W), then "
                              "L2-normalised, as RepDistiller (which pairs it with beta 200)."},
    "translator_bn": {"type": "boolean", "default": False,
                      "description": "BatchNorm in the translator: false as the authors, true as RepDistiller."},
    "paraphraser_loss": {"type": "string", "enum": ["l1", "mse"], "default": "l1",
                         "description": "Stage-1 reconstruction loss: l1 as the authors, mse as RepDistiller."},
    "paraphraser_epochs": {"type": "integer", "minimum": 1, "default": 6,
                           "description": "Stage-1 epochs: 6 as the authors (RepDistiller: 30)."},
    "paraphraser_lr": {"type": "number", "exclusiveMinimum": 0, "default": 0.1,
                       "description": "Stage-1 SGD learning rate: 0.1 as the authors (RepDistiller: 0.01)."},
}
PARAPHRASER_KEYS = ("rate", "paraphraser_loss", "paraphraser_epochs", "paraphraser_lr")


def paraphraser_setting(settings):
    """A readable directory label for the stage-1 settings (one paraphraser per teacher run and label)."""
    return (f"k{settings['rate']:g}_{settings['paraphraser_loss']}_{settings['paraphraser_epochs']}ep"
            f"_lr{settings['paraphraser_lr']:g}")


def conv_stack(channels, transposed=False, batch_norm=False):
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers.append(conv(c_in, c_out, 3, stride=1, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def factor_channels(rate):
    return max(1, int(STAGE_CHANNELS[-1] * rate))


class Paraphraser(nn.Module):
    def __init__(self, rate):
        super().__init__()
        c, k = STAGE_CHANNELS[-1], factor_channels(rate)
        self.encoder = conv_stack([c, c, k, k])
        self.decoder = conv_stack([k, k, c, c], transposed=True)

    def forward(self, x):
        return self.decoder(self.encoder(x))


FACTORS = {
    "flatten": lambda x: F.normalize(x.flatten(1), dim=1),
    "channel_mean_sq": lambda x: F.normalize(x.pow(2).mean(1).flatten(1), dim=1),
}


class ParaphraserError(Exception):
    """Stage 2's paraphraser is missing, or was pre-trained for other settings or another teacher."""


def load_paraphraser(path, settings, teacher_sha256=None):
    if not path:
        raise ParaphraserError("ft: config key 'paraphraser' is missing; stage 2 needs the paraphraser that "
                               "stage 1 writes (`kdlab pretrain-paraphraser`, or the workflow's "
                               "pretrain_paraphraser rule)")
    path = Path(path)
    if not path.exists():
        raise ParaphraserError(
            f"ft: stage 2 needs the pre-trained paraphraser, but {path} does not exist; run stage 1 first "
            f"(`kdlab pretrain-paraphraser`, or let the workflow's pretrain_paraphraser rule run)")
    try:
        saved = load_checked(path)  # verifies its checksum
        if not {"settings", "state_dict"} <= saved.keys():
            raise UnreadableFile(f"{path} is not a paraphraser file")
    except UnreadableFile as e:
        raise UnreadableFile(f"ft paraphraser {path}: {e}. It is the output of rule pretrain_paraphraser: delete "
                             f"{path} and run snakemake again to rebuild it") from None
    rebuild = f"delete {path} and run snakemake again to rebuild it (rule pretrain_paraphraser)"
    for key in PARAPHRASER_KEYS:
        if saved["settings"][key] != settings[key]:
            raise ParaphraserError(f"ft: {path} was trained with {key}={saved['settings'][key]!r}, but this run asks "
                                   f"for {settings[key]!r}: {rebuild}")
    if teacher_sha256 and saved.get("teacher_weights_sha256", teacher_sha256) != teacher_sha256:
        raise ParaphraserError(f"ft: {path} was pre-trained on another teacher's features (teacher weights sha256 "
                               f"{saved['teacher_weights_sha256'][:12]}..., this run's teacher {teacher_sha256[:12]}...): "
                               f"{rebuild}")
    paraphraser = Paraphraser(settings["rate"])
    paraphraser.load_state_dict(saved["state_dict"])
    return paraphraser


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()
        self.weight, self.factor = settings["weight"], FACTORS[settings["factor"]]
        # Its own hash of the teacher: the loss is built before train() hashes its inputs, and
        # moving that would change the order of random draws (the connectors' initial weights).
        teacher_sha256 = file_sha256(run["teacher_weights"]) if run.get("teacher_weights") else None
        self.paraphraser = load_paraphraser(run.get("paraphraser"), settings,
                                            teacher_sha256).requires_grad_(False).eval()
        c = STAGE_CHANNELS[-1]
        self.translator = conv_stack([c, c] + [factor_channels(settings["rate"])] * 2,
                                     batch_norm=settings["translator_bn"])

    def train(self, mode=True):
        super().train(mode)
        self.paraphraser.eval()  # frozen, always in eval mode
        return self

    def terms(self, student_out, teacher_out, labels, index):
        factor_t = self.factor(self.paraphraser.encoder(teacher_out[2])).detach()
        factor_s = self.factor(self.translator(student_out[2]))
        return {"ft_factor": self.weight * F.l1_loss(factor_s, factor_t)}
