"""Distillation methods, registered by name.

A method is one module with:
  NAME, VERSION      the name users write; VERSION goes up whenever the loss changes
                     meaning, so runs made with an older loss can be found and rerun
  NEEDS_TEACHER      whether it needs the frozen teacher's outputs
  TEACHER_OUTPUTS    optional: "logits+embedding" if the loss reads only teacher_out[-2]
                     (embedding) and teacher_out[-1] (logits); such methods are served
                     from the teacher-output cache (kdlab/teacher_cache.py)
  STUDENT_OUTPUTS    optional: "logits+embedding" if the loss reads only student_out[-2:];
                     the student's stage features then leave its forward detached
                     (kdlab/train.py student_forward). Both are checked against each
                     method's loss (tests/test_methods.py)
  SETTINGS           JSON-schema fragments of its config keys, each with a default and
                     a description that says where the default comes from
  check(settings)    optional: raise ValueError for settings it cannot train with
  Loss(settings, run)                 a MethodLoss; `run` is the resolved run config plus
                                      "train_labels" (the training set's labels, added by
                                      kdlab/loss.py build_loss)

The student's loss is (1 - alpha) * CE + alpha * sum(Loss(...) terms), or in the additive
form ce_weight * CE + kd_weight * KD + sum(Loss(...) terms) (kdlab/loss.py).
Adding a method: one module here and one entry in METHODS. What runs every training step
(terms, the forward of anything the loss trains) must not read device values on the host
(.item(), float(), if tensor, indexing with a boolean mask, nonzero, ...): on a GPU each
is a sync that stalls the launch queue. tests/test_sync_free.py checks every method on the meta device.
"""

from . import at, cc, crd, dist, dkd, fitnets, ft, kd, nst, none, pkt, rkd, sp, vid

METHODS = {m.NAME: m for m in (none, kd, fitnets, rkd, ft, at, sp, pkt, cc, nst, vid, crd, dkd, dist)}


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_versions():
    return {name: m.VERSION for name, m in METHODS.items()}
