"""CIFAR ResNets (He et al. 2016): depth 6n+2, BasicBlocks, 16/32/64 channels.

Every model's forward returns (stage1, stage2, stage3, embedding, logits): the three
post-ReLU stage outputs (16x32x32, 32x16x16, 64x8x8), the pooled 64-d embedding that
feeds the classifier, and the logits last, so each distillation method takes what
it needs.
"""

import torch
from torch import nn
import torch.nn.functional as F

# Blocks per stage. ResNet112 is the official Factor Transfer code's name for the
# 18-blocks-per-stage network (resnet110 plus its two projection convs).
BLOCKS_PER_STAGE = {
    "ResNet8": 1, "ResNet14": 2, "ResNet20": 3, "ResNet32": 5, "ResNet44": 7,
    "ResNet56": 9, "ResNet110": 18, "ResNet112": 18,
}
STAGE_CHANNELS = (16, 32, 64)
STAGE_SIZES = (32, 16, 8)
EMBEDDING_DIM = STAGE_CHANNELS[-1]


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, in_channels = [], 16
        for i, channels in enumerate(STAGE_CHANNELS):
            blocks = [BasicBlock(in_channels if b == 0 else channels, channels,
                                 2 if (i > 0 and b == 0) else 1) for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(EMBEDDING_DIM, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return (*features, embedding, self.fc(embedding))


def build_model(name, num_classes):
    if name not in BLOCKS_PER_STAGE:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(BLOCKS_PER_STAGE)}")
    return CifarResNet(BLOCKS_PER_STAGE[name], num_classes)
