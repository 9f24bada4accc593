"""kdlab: knowledge-distillation research on CIFAR ResNets."""

__version__ = "0.1.0"
