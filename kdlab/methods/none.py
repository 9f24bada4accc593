"""Plain student (and teacher) training: cross-entropy only."""

from .base import MethodLoss

NAME = "none"
VERSION = 1
NEEDS_TEACHER = False
STUDENT_OUTPUTS = "logits+embedding"  # cross-entropy reads only the logits
SETTINGS = {}


class Loss(MethodLoss):
    def __init__(self, settings, run):
        super().__init__()

    def terms(self, student_out, teacher_out, labels, index):
        return {}
