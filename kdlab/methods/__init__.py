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
Adding a method: one module here, imported in the `from . import` line and named in the
METHODS tuple below (keep that form: `kdlab results` reads the registry from this source
without importing torch). A module that lacks part of the interface makes the import of this
package raise a TypeError naming the file and what is missing (Snakemake and every kdlab command
but `kdlab results` import it). The tests then ask for the rest, each naming what to add:
a float64 reference test (tests/test_methods_more.py), a section for its settings in
config/README.md, its name in the method lists of README.md and config/README.md, and in
config/demo.yaml (the demo runs every method) with the job counts that config/README.md
gives for the demo. What runs every training step
(terms, the forward of anything the loss trains) must not read device values on the host
(.item(), float(), if tensor, indexing with a boolean mask, nonzero, ...): on a GPU each
is a sync that stalls the launch queue. tests/test_sync_free.py checks every method on the meta device.
"""

from . import at, cc, crd, dist, dkd, fitnets, ft, kd, nst, none, pkt, rkd, sp, vid
from .base import MethodLoss

OUTPUT_DECLARATIONS = (None, "logits+embedding")  # TEACHER_OUTPUTS and STUDENT_OUTPUTS


def interface_problems(module):
    """What `module` lacks of the interface above (empty when it has it all)."""
    problems = [f"{attr} ({kind.__name__})" for attr, kind in
                (("NAME", str), ("VERSION", int), ("NEEDS_TEACHER", bool), ("SETTINGS", dict))
                if not isinstance(getattr(module, attr, None), kind)]
    problems += [f"{attr} must be one of {OUTPUT_DECLARATIONS}" for attr in ("TEACHER_OUTPUTS", "STUDENT_OUTPUTS")
                 if getattr(module, attr, None) not in OUTPUT_DECLARATIONS]
    settings = getattr(module, "SETTINGS", None)
    problems += [f"SETTINGS[{key!r}] needs a default and a description" for key, schema in
                 (settings.items() if isinstance(settings, dict) else ())
                 if not (isinstance(schema, dict) and "default" in schema and "description" in schema)]
    loss = getattr(module, "Loss", None)
    if not (isinstance(loss, type) and issubclass(loss, MethodLoss)):
        problems.append("Loss (a subclass of kdlab.methods.base.MethodLoss)")
    return problems


def check_interfaces(modules):
    for module in modules:
        problems = interface_problems(module)
        if problems:
            raise TypeError(f"kdlab/methods/{module.__name__.rsplit('.', 1)[-1]}.py: missing or wrong: "
                            f"{'; '.join(problems)} (the interface: kdlab/methods/__init__.py)")


METHODS = {m.NAME: m for m in (none, kd, fitnets, rkd, ft, at, sp, pkt, cc, nst, vid, crd, dkd, dist)}
check_interfaces(METHODS.values())


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_versions():
    return {name: m.VERSION for name, m in METHODS.items()}
