"""How a distilled student's loss combines CE with the method's terms.

Two forms, chosen per run (config: a method's `alphas` or its `additive` recipes):
  convex    (1 - alpha) * CE + alpha * L_method                      (the group's)
  additive  ce_weight * CE + kd_weight * KD + L_method                (RepDistiller, mdistiller)
L_method is the sum of the method's terms, each already multiplied by its weight setting.
For method kd the additive form is ce_weight * CE + kd_weight * KD (its loss is the KD term).
The two forms are different runs, not rescalings of each other: under SGD with momentum
and weight decay, multiplying the whole loss by c is a learning rate c times as large
with weight decay 1/c times as strong.
"""

from .methods import get_method, kd
from .methods.base import MethodLoss


def loss_weights(run):
    """(weight of CE, weight of the method loss's summed terms) for a distilled run."""
    if "additive" in run:
        return run["additive"]["ce_weight"], 1.0
    return 1.0 - run["alpha"], run["alpha"]


def build_loss(run, train_labels):
    """The run's method loss; in the additive form its terms include the KD term's weight.
    The training set's labels (already loaded by the caller) reach the method as run["train_labels"]."""
    method_loss = get_method(run["method"]).Loss(run["method_settings"], {**run, "train_labels": train_labels})
    if "additive" not in run:
        return method_loss
    return Additive(method_loss, run["additive"], own_kd=run["method"] == "kd")


class Additive(MethodLoss):
    """The method's terms plus kd_weight * KD at kd_temperature (method kd: its own terms x kd_weight)."""

    def __init__(self, method_loss, recipe, own_kd):
        super().__init__()
        self.method, self.kd_weight, self.own_kd = method_loss, recipe["kd_weight"], own_kd
        self.kd = None if own_kd or not self.kd_weight else kd.Loss({"temperature": recipe["kd_temperature"]}, {})

    def start_epoch(self, epoch):
        self.method.start_epoch(epoch)

    def terms(self, student_out, teacher_out, labels, index):
        terms = self.method.terms(student_out, teacher_out, labels, index)
        if self.own_kd:
            return {name: self.kd_weight * value for name, value in terms.items()}
        if self.kd is not None:
            terms["kd"] = self.kd_weight * self.kd.terms(student_out, teacher_out, labels, index)["kd"]
        return terms
