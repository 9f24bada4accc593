"""The training-health guard: what stops a run whose loss, gradient or weights went wrong,
with a message that says where and why, before anything bad is saved. The step loop
(kdlab/train.py) keeps each step's figures on the device; StepTally judges them as they
are read back to the host."""

import math
from itertools import chain, count
from pathlib import Path

import torch

from .runio import atomic_write_json

MIN_LOSS_SCALE = 2.0 ** -14  # below this, fp16-scaled gradients underflow to zero


class GuardError(RuntimeError):
    """The training-health guard stopped the run."""


class StepTally:
    """One epoch's step figures, kept on the device and read back to the host every
    `sync_every` steps: the sums behind the epoch's averages, and the health guard's verdict
    on each step, in order."""

    def __init__(self, scaler, amp, max_skipped, state, sync_every=1):
        # The scale as the last step left it (1.0 when the scaler is off; it changes only in
        # update()); a step's row holds the scale after it, which drops exactly when the
        # GradScaler skipped that step.
        self.scaler, self.scaled, self.loss_scale = scaler, scaler.is_enabled(), scaler.get_scale()
        self.amp, self.max_skipped, self.state, self.sync_every = amp, max_skipped, state, sync_every
        self.sums, self.seen, self.skipped, self.nonfinite, self.last_loss = {}, 0, 0, 0, float("nan")
        self.names, self.pending, self.sizes, self.unscaled = [], [], [], None

    def add(self, step, names, figures, batch, last):
        """Keep a step's figures (step_figures) with the loss scale after its update(); at every
        `sync_every`-th step and the epoch's last, read the kept ones (one sync) and return
        (step, what went wrong) for the first step at which the run must stop, else None."""
        if self.unscaled is None:
            self.unscaled = figures.new_ones(1)
        self.names = names
        self.pending.append(torch.cat([figures, self.scaler._scale.reshape(1) if self.scaled else self.unscaled]))
        self.sizes.append(batch)
        if len(self.pending) < self.sync_every and not last:
            return None
        rows, sizes, self.pending, self.sizes = torch.stack(self.pending).tolist(), self.sizes, [], []
        return self.read(names, rows, sizes, step + 1 - len(rows))

    def add_epoch_to(self, history, **figures):
        """Append the epoch's averages and guard counts, and `figures`, to the run's history."""
        seen = max(self.seen, 1)
        for name in self.names:
            history["terms"].setdefault(name, []).append(self.sums.get(name, float("nan")) / seen)
        for key, value in {"train_loss": self.sums.get("loss", float("nan")) / seen,
                           "train_acc": 100.0 * self.sums.get("correct", 0.0) / seen, **figures,
                           "skipped_steps": self.skipped, "nonfinite_losses": self.nonfinite}.items():
            history[key].append(value)

    def read(self, names, rows, sizes, first_step):
        """Tally rows of (loss terms..., loss, correct, gradient norm, loss scale) of steps
        first_step, first_step + 1, ...; return (step, what went wrong) for the first step at
        which the run must stop, else None."""
        for at, batch, (*term_values, total, correct, norm, scale) in zip(count(first_step), sizes, rows):
            self.last_loss = total
            bad = [name for name, v in zip(names, term_values) if not math.isfinite(v)]
            self.nonfinite += bool(bad) or not math.isfinite(total)
            if not self.scaled and (bad or not math.isfinite(total) or not math.isfinite(norm)):
                return at, (f"{what_went_wrong(bad, total)}; amp is {self.amp!r}, so there is no GradScaler to skip "
                            f"the step ({step_terms(names, term_values)}).")
            scale_before, self.loss_scale = self.loss_scale, scale
            if self.loss_scale < scale_before or self.loss_scale == 0:  # the GradScaler skipped this step
                self.skipped += 1
                self.state["consecutive_skipped"] += 1
                if self.state["consecutive_skipped"] >= self.max_skipped:
                    return at, (f"{self.state['consecutive_skipped']} consecutive optimizer steps skipped by the "
                                f"fp16 GradScaler; {what_went_wrong(bad, total)} ({step_terms(names, term_values)}).")
                continue
            if self.scaled and self.loss_scale < MIN_LOSS_SCALE:
                # Intermittent overflows halve the scale faster than it regrows: the scaled
                # gradients underflow to zero and the weights stop moving, without a streak.
                return at, (f"the fp16 GradScaler's scale fell to {self.loss_scale:.3g}; gradients overflow too "
                            f"often to train.")
            self.state["consecutive_skipped"] = 0
            self.seen += batch
            for name, value in [*zip(names, term_values), ("loss", total)]:
                self.sums[name] = self.sums.get(name, 0.0) + value * batch
            self.sums["correct"] = self.sums.get("correct", 0.0) + correct
        return None


def nonfinite_tensors(*modules):
    """Names of the floating-point parameters and buffers of modules that hold NaN or infinity."""
    named = [(name, t) for m in modules for name, t in chain(m.named_parameters(), m.named_buffers())
             if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()  # one host sync
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_weights_and_test_loss(record, run_dir, run, epoch, test_loss, *modules):
    """Before every checkpoint and before completion: non-finite weights are never saved.
    The step's guard sees only the loss and gradient; the step itself (weight decay, a huge
    lr) can still make weights non-finite, and a training forward pass updates buffers
    (BatchNorm's running statistics, CRD's memory) even when the GradScaler skips its step."""
    bad = nonfinite_tensors(*modules)
    if bad or not math.isfinite(test_loss):
        weights = {name for m in modules for name, _ in m.named_parameters()}
        bad_weights, bad_buffers = [n for n in bad if n in weights], [n for n in bad if n not in weights]
        if bad_weights:
            what = f"{len(bad_weights)} weight tensor(s) went non-finite in the optimizer step ({some(bad_weights)})"
        elif bad_buffers:
            what = (f"{len(bad_buffers)} buffer(s) went non-finite ({some(bad_buffers)}) while every weight is "
                    f"finite: a training forward pass updates them (BatchNorm's running statistics) even when the "
                    f"GradScaler skips its step, so a NaN input or an overflowing activation leaves them non-finite")
        else:
            what = f"the test loss is {test_loss}"
        stop(record, run_dir, f"health guard: method {run['method']!r}, epoch {epoch + 1}: {what}. "
             f"The last good checkpoint is kept.")


def guard_where(run, epoch, step):
    return f"health guard: method {run['method']!r}, epoch {epoch + 1}, step {step + 1}"


def some(names):
    return f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def step_terms(names, values):
    return "that step's loss terms: " + ", ".join(f"{name} {value:.4g}" for name, value in zip(names, values))


def share_note(share, method):
    """The epoch's gradient share in a guard message: a method term that overwhelms CE shows there."""
    return "" if share is None else (f" At this epoch's first step the {method} loss sent {100 * share:.0f}% of the "
                                     f"gradient (the rest: CE).")


def what_went_wrong(bad_terms, total):
    if bad_terms:
        return f"loss term {', '.join(repr(t) for t in bad_terms)} went non-finite"
    if not math.isfinite(total):
        return "the weighted sum of the loss terms overflowed although every term was finite"
    return "the gradient went non-finite although every loss term was finite"


def stop(record, run_dir, message):
    """The health guard: mark the run failed (the last good checkpoint stays) and stop."""
    atomic_write_json(Path(run_dir) / "progress.json", record("failed", message))
    raise GuardError(message)
