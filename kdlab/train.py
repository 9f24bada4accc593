"""The training loop for teachers, plain students and distilled students.

One function, `train`, reads top to bottom: set up, resume if a matching checkpoint
exists, then per epoch train, evaluate, log, checkpoint. Distillation plugs in through
the method's Loss (kdlab/methods); the student's loss is (1 - alpha) * CE + alpha * L or
ce_weight * CE + kd_weight * KD + L (kdlab/loss.py).
"""

import json
import math
import os
import random
import shutil
import sys
import time
from itertools import count
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, fingerprint, resolve_run, split_runtime
from .data import load_dataset, make_loaders
from .guard import StepTally, check_weights_and_test_loss, guard_where, share_note, stop
from .layout import recipe_name
from .loss import build_loss, loss_weights
from .methods import get_method
from .models import build_model
from .runio import (UnreadableFile, atomic_write_json, code_sha256, file_sha256, json_intact, load_checked, now,
                    previous_path, provenance, remove_completion_marks, remove_temporaries, save_checkpoint,
                    save_weights, torch_load, verify_weights)
from .teacher_cache import TeacherCache, cache_key, cache_path, why_not_cached

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Steps between reads of the step figures (loss terms, accuracy, guard state) to the
# host. A read stalls CUDA's launch queue; on the CPU it costs nothing. A non-finite
# step never reaches the weights in between (skipped on the device), and the guard
# stops the run at the next read, naming the step, before any checkpoint is written.
SYNC_EVERY = {"cuda": 50}
COMPILE_CACHE_BYTES = 512 << 20  # a CPU compile writes a 150 MB precompiled header, then its kernels
# What a resume's record (provenance.resumes) leaves out of its process's provenance: what
# belongs to the run's start, or must equal the start's for the checkpoint to be resumed.
START_ONLY_KEYS = ("started", "finished", "data_sha256", "fingerprint", "inputs_sha256")


def log(message):
    print(message, flush=True)


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        given = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if given not in ("", "-1", "NoDevFiles"):
            # A job given a GPU that torch cannot use (a driver older than torch's CUDA build,
            # say) would otherwise train on the CPU, tens of times slower, until its walltime.
            raise ConfigError(f"config key 'training.device': 'auto', and this job was given GPU(s) "
                              f"(CUDA_VISIBLE_DEVICES={given}), but torch {torch.__version__} cannot use CUDA "
                              f"({why_no_cuda()}); fix that, or set it to 'cpu' to train on the CPU")
        return torch.device("cpu")
    device = torch.device(name)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        # Checked here, in the job, not by check-config: a cluster's login node has no GPU.
        raise ConfigError(f"config key 'training.device': {name!r}, but this machine has {gpus} usable CUDA "
                          f"device(s){'' if gpus else f' ({why_no_cuda()})'}; use 'auto' (the GPU where there is "
                          f"one) or 'cpu'")
    return device


def why_no_cuda():
    try:
        torch.cuda.init()
    except Exception as e:  # the driver's or the build's own words
        return (str(e).splitlines() or [type(e).__name__])[0]
    return "no CUDA device is visible"


def check_compile_cache():
    """torch.compile writes its kernels under TORCHINDUCTOR_CACHE_DIR, by default in $TMPDIR or /tmp,
    which is often small or full on a compute node; there, the first step fails with a C++ or
    Triton compile error ("cannot write PCH file") that does not say the disk is full."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir  # torch's own rule for where it is
    except ImportError:  # another torch: nothing to check, compiling still works
        return
    try:
        path = cache_dir()  # created here, as torch would
        free = shutil.disk_usage(path).free
    except OSError as e:
        log(f"WARNING: torch.compile's cache directory cannot be used ({e}): set TORCHINDUCTOR_CACHE_DIR to a "
            f"writable directory with {COMPILE_CACHE_BYTES >> 20} MB free, or training.compile to false")
        return
    if free < COMPILE_CACHE_BYTES:
        log(f"WARNING: torch.compile's cache directory {path} has {free >> 20} MB free, and compiling needs up to "
            f"{COMPILE_CACHE_BYTES >> 20} MB (a full disk fails the first step with a compile error): set "
            f"TORCHINDUCTOR_CACHE_DIR to a directory with space")


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def lr_at(epoch, tr):
    if tr["schedule"] == "cosine":
        return 0.5 * tr["lr"] * (1 + math.cos(math.pi * epoch / tr["epochs"]))
    return tr["lr"] * tr["lr_decay"] ** sum(epoch >= m for m in tr["milestones"])


class Normalize:
    """uint8 NCHW batch -> normalised float on the device, channels_last if asked."""

    def __init__(self, mean, std, device, channels_last=False):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = memory_format(channels_last)

    def __call__(self, images):
        return ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def memory_format(channels_last):
    # channels_last (NHWC in memory) is what fast CPU and cuDNN bf16/fp16 convolutions want.
    return torch.channels_last if channels_last else torch.contiguous_format


class FeaturesDetached(torch.nn.Module):
    """The model, with its stage features (every output but the embedding and logits) detached."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        *features, embedding, logits = self.model(x)
        return (*(f.detach() for f in features), embedding, logits)


def student_forward(model, method):
    """The student as the training step calls it. For a method whose loss reads only the
    student's embedding and logits (its STUDENT_OUTPUTS), the stage features leave the
    forward detached: a compiled backward cannot see that no gradient comes back to them,
    so it would fill zero gradients for them and add them in, every step (4% of a compiled
    ResNet20 step on the CPU). Eager autograd skips them anyway."""
    if getattr(method, "STUDENT_OUTPUTS", None) == "logits+embedding":
        return FeaturesDetached(model)
    return model


def checked_teacher_weights(path):
    """The SHA-256 of a teacher's weights, checked against their checksum file; an UnreadableFile
    that says what to do where they are missing or damaged."""
    if not Path(path).exists():
        raise UnreadableFile(f"teacher weights {path} do not exist: they are the output of rule train_teacher "
                             f"(import_teacher for a published checkpoint); run snakemake, which trains the "
                             f"teacher before this run")
    try:
        return verify_weights(path)
    except UnreadableFile as e:
        raise damaged_teacher_weights(path, e) from None


def damaged_teacher_weights(path, error):
    return UnreadableFile(f"teacher weights {path}: {str(error).splitlines()[0]}. They are the output of rule "
                          f"train_teacher (import_teacher for a published checkpoint): delete {path} and run "
                          f"snakemake again to rebuild them")


def load_frozen_teacher(run, num_classes, device, channels_last=False):
    teacher, path = build_model(run["teacher"], num_classes), run["teacher_weights"]
    checked_teacher_weights(path)
    try:
        weights = torch_load(path)
        if not isinstance(weights, dict):
            raise UnreadableFile(f"it holds a {type(weights).__name__}, not a state dict")
    except UnreadableFile as e:
        raise damaged_teacher_weights(path, e) from None
    try:
        teacher.load_state_dict(weights)
    except RuntimeError as e:  # a sound file of another architecture or number of classes
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ConfigError(f"teacher weights {path} do not fit teacher {run['teacher']} with {num_classes} classes"
                          f"{': ' + details[0] if details else ''}") from None
    return teacher.to(device, memory_format=memory_format(channels_last)).eval().requires_grad_(False)


@torch.inference_mode()
def evaluate(model, loader, normalize, device, autocast):
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once, not per batch
    correct, count = torch.zeros((), dtype=torch.int64, device=device), 0
    for images, labels, _ in loader:
        x, y = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(x)[-1].float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    return loss_sum.item() / count, 100.0 * correct.item() / count


def fused_sgd(params, tr):
    """SGD in one kernel: fast, and it skips a step on the device (found_inf) without a host sync.

    Momentum buffers start at zero, which gives SGD's first step (buf = grad) exactly: torch's
    fused SGD leaves an uninitialised buffer behind when the very first step is skipped.
    """
    optimizer = torch.optim.SGD(params, lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
                                fused=True)
    if tr["momentum"]:
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def match_momentum_layouts(optimizer):
    """Each loaded momentum buffer in its weight's memory layout. A run may resume with
    channels_last switched (a runtime key), and the buffers keep the checkpoint's layout; fused
    SGD walks weight, gradient and buffer as flat memory: the CPU kernel silently adds up
    mismatched elements, CUDA's refuses them (check_fast_path_restrictions)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffer)


def gradient_share(method_grads, params):
    """Fraction of the gradient norm on the student's weights that comes from the method's loss.

    Taken on a training step itself: `method_grads` is the method term's gradient alone (one
    extra backward on the step's graph), and the CE part is what the step's gradient adds to
    it. No extra forward, so it costs a backward once per epoch and never touches BatchNorm's
    statistics. A loss scale cancels out of the ratio.
    """
    method = [torch.zeros_like(p) if g is None else g for g, p in zip(method_grads, params)]
    ce = [(torch.zeros_like(p) if p.grad is None else p.grad) - g for g, p in zip(method, params)]
    norm = torch.nn.utils.get_total_norm
    method_norm, ce_norm = torch.stack([norm(method), norm(ce)]).tolist()
    if not (math.isfinite(method_norm) and math.isfinite(ce_norm)) or method_norm + ce_norm == 0:
        return None  # an overflowed step (one the GradScaler skips) has no share to tell
    return method_norm / (method_norm + ce_norm)


def backward_with_share(scaler, loss, method_loss, student_params):
    """The step's backward, and the method term's share of the student's gradient
    (gradient_share): the term's gradient alone comes first, before backward() frees the graph."""
    method_grads = torch.autograd.grad(scaler.scale(method_loss), student_params, retain_graph=True,
                                       allow_unused=True)
    scaler.scale(loss).backward()
    return gradient_share(method_grads, student_params)


def step_figures(terms, loss, logits, labels, params, scaler, optimizer):
    """The step's figures, kept on the device: (loss terms..., loss, correct, gradient norm).
    Without a GradScaler a non-finite one skips the step on the device (fused SGD reads
    found_inf), so a non-finite step never reaches the weights."""
    grad_norm = loss.new_zeros(()) if scaler.is_enabled() else torch.nn.utils.get_total_norm(
        [p.grad for p in params if p.grad is not None])
    figures = torch.stack([*(t.detach().float() for t in terms.values()), loss.detach().float(),
                           (logits.argmax(1) == labels).sum().float(), grad_norm.float()])
    if not scaler.is_enabled():
        optimizer.found_inf = (~torch.isfinite(figures).all()).float()
    return figures


def restore(ckpt, model, loss_fn, optimizer, scaler):
    model.load_state_dict(ckpt["model"])
    loss_fn.load_state_dict(ckpt["method"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # a checkpoint from before kdlab fused SGD says fused: None
        group["fused"] = True
    match_momentum_layouts(optimizer)
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])


def new_history():
    keys = ["train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
            "skipped_steps", "nonfinite_losses", "grad_share"]
    return {**{k: [] for k in keys}, "terms": {}}


def run_record(run, status, state, epochs_planned, prov, num_classes, error=None):
    history = state["history"]
    acc = history["test_acc"]
    distilled, additive = run["kind"] == "distill", run.get("additive")
    best_epoch = int(np.argmax(acc)) + 1 if acc else None  # 1-based, as in the log lines
    return {
        "status": status, "error": error,
        "run": {"kind": run["kind"], "dataset": run["data"]["dataset"], "method": run["method"],
                "alpha": run["alpha"] if distilled and not additive else None, "teacher": run["teacher"],
                "loss_form": ("additive" if additive else "convex") if distilled else None,
                "ce_weight": additive["ce_weight"] if additive else None,
                "kd_weight": additive["kd_weight"] if additive else None,
                "recipe": recipe_name(run["alpha"], additive) if distilled else None,
                "student": run["model"], "seed": run["seed"], "num_classes": num_classes},
        "method_version": get_method(run["method"]).VERSION,
        "epochs_planned": epochs_planned, "epochs_done": len(acc), "history": history,
        "best_acc": max(acc) if acc else None, "best_epoch": best_epoch,
        "last_acc": acc[-1] if acc else None, "teacher_acc": state["teacher_acc"],
        "resumed_at_epochs": state["resumed_at_epochs"], "config": run, "provenance": prov,
    }


def load_resume_state(path, run_fingerprint, force_restart, identity):
    """The checkpoint to resume from, or None (with the reason logged) to start fresh.

    `identity` ({"data_sha256", "code_sha256"}, as the checkpoints store it): a checkpoint of
    other data is not resumed, and a finished checkpoint of the same code is returned, to
    write the run's outputs from it (a rerun after Snakemake lost track of a finished job,
    or after its outputs were deleted, trains nothing)."""
    if force_restart:
        log("--force-restart: starting fresh")
        return None
    # The latest checkpoint, else the one before it (save_checkpoint keeps two): a damaged
    # one (empty, truncated, garbage, checksum mismatch) is moved aside, never deleted.
    damaged = False
    for candidate, name in ((path, "checkpoint"), (previous_path(path), "previous checkpoint")):
        if not candidate.exists():
            continue
        try:
            ckpt = load_checked(candidate)
        except UnreadableFile as e:
            aside = candidate.with_name(f"{candidate.stem}.corrupt{candidate.suffix}")
            for n in count(2):  # never over an earlier damaged one
                if not aside.exists():
                    break
                aside = candidate.with_name(f"{candidate.stem}.corrupt{n}{candidate.suffix}")
            candidate.replace(aside)
            log(f"WARNING: {e}; moved it to {aside}")
            damaged = True
            continue
        if ckpt.get("fingerprint") != run_fingerprint:
            log(f"{name} belongs to a different configuration (fingerprint changed): starting fresh")
            return None
        if ckpt.get("data_sha256", identity["data_sha256"]) != identity["data_sha256"]:
            log(f"{name} was trained on other data (the dataset's files changed): starting fresh")
            return None
        if ckpt.get("finished"):
            if ckpt.get("code_sha256") != identity["code_sha256"]:
                log(f"{name} is of a finished run of other code (kdlab or torch changed): starting fresh")
                return None
            log(f"{name} holds this run, finished by the same code: writing its outputs from it, without training")
        if candidate != path:
            log(f"resuming from the previous checkpoint {candidate}")
        return ckpt
    if damaged:
        log("no usable checkpoint left: starting fresh")
    return None


def train(run, run_dir, force_restart=False):
    run = resolve_run(run)
    run_dir = Path(run_dir)
    tr, method = run["training"], get_method(run["method"])
    device = pick_device(tr["device"])
    seed_everything(run["seed"], tr["deterministic"])
    arrays = load_dataset(run["data"])
    train_loader, test_loader = make_loaders(arrays, tr["batch_size"], tr["num_workers"], run["seed"],
                                             device.type == "cuda", tr["eval_batch_size"], run["data"]["augmentation"])
    channels_last = tr["channels_last"]
    normalize = Normalize(arrays.mean, arrays.std, device, channels_last)
    model = build_model(run["model"], arrays.num_classes).to(device, memory_format=memory_format(channels_last))
    loss_fn = build_loss(run, arrays.train_y).to(device)
    teacher = load_frozen_teacher(run, arrays.num_classes, device, channels_last) if method.NEEDS_TEACHER else None
    distilled = run["kind"] == "distill"
    ce_weight, method_weight = loss_weights(run) if distilled else (1.0, 0.0)
    student_params = [p for p in model.parameters() if p.requires_grad]
    params = student_params + [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = fused_sgd(params, tr)
    amp_dtype = AMP_DTYPES.get(tr["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=tr["amp"] == "fp16")
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731

    # Made only now that the inputs have loaded: a run refused for a missing input leaves no empty run directory.
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)  # from writes that a kill interrupted

    inputs = {k: file_sha256(run[k]) for k in ("teacher_weights", "paraphraser") if run[k]}
    run_fingerprint = fingerprint(run, inputs)
    checkpoint_path = run_dir / "checkpoint.pth"
    identity = {"code_sha256": code_sha256(), "data_sha256": arrays.sha256()}
    ckpt = load_resume_state(checkpoint_path, run_fingerprint, force_restart, identity)
    # A finished run only rewrites its outputs: it reads no teacher cache (2.66 GB for CIFAR-100,
    # and every student of a teacher whose job reran is rerun).
    finished = bool(ckpt and ckpt.get("finished"))
    teacher_outputs, teacher_from = (None, None) if finished else teacher_source(
        run, teacher, inputs.get("teacher_weights"), arrays, device, tr["compile"])
    if tr["compile"] and not finished:
        check_compile_cache()
    student = student_forward(model, method)
    forward = torch.compile(student) if tr["compile"] else student  # `model` keeps the state_dict's names
    stopped_by = why_it_stopped(run_dir) if ckpt and not finished else None
    if ckpt:
        restore(ckpt, model, loss_fn, optimizer, scaler)
        state = ckpt["state"]
        if not finished:
            state["resumed_at_epochs"].append(ckpt["epoch"])
            log(f"resuming from the checkpoint at epoch {ckpt['epoch']}/{tr['epochs']}; the process before: "
                f"{stopped_by or 'no record of how it stopped'}")
    else:
        remove_completion_marks(run_dir)
        teacher_acc = evaluate(teacher, test_loader, normalize, device, autocast)[1] if teacher else None
        state = {"history": new_history(), "teacher_acc": teacher_acc, "started": now(), "resumed_at_epochs": [],
                 "consecutive_skipped": 0}  # in the checkpoint: a streak of skipped steps survives a resume
        if teacher:
            log(f"teacher {run['teacher']} test accuracy: {teacher_acc:.2f}%")
    here = {**provenance(device, state["started"], identity["data_sha256"]), "fingerprint": run_fingerprint,
            "inputs_sha256": inputs, "runtime": split_runtime(run)[1],
            "teacher_outputs": teacher_from}  # teacher_cache on says where it may apply, not that it did
    prov = run_provenance(state, ckpt, here, run, stopped_by)
    history, start_epoch = state["history"], len(state["history"]["test_acc"])
    record = lambda status, error=None: run_record(state.get("config", run), status, state, tr["epochs"],  # noqa: E731
                                                   prov, arrays.num_classes, error)
    if ckpt and not finished:  # the last process's status (interrupted, failed) is not this one's
        atomic_write_json(run_dir / "progress.json", record("running"))
    recipe = recipe_name(run["alpha"], run.get("additive")) if distilled else "plain"
    log(f"{run['kind']} {run['model']} method={run['method']} {recipe} seed={run['seed']} "
        f"on {run['data']['dataset']} ({len(arrays.train_x)} train / {len(arrays.test_x)} test images, "
        f"{arrays.num_classes} classes), device {here['device']}, amp {tr['amp']}, fingerprint {run_fingerprint}")
    show_bar = sys.stderr.isatty()
    saved_at = time.monotonic()

    for epoch in range(start_epoch, tr["epochs"]):
        t0 = time.perf_counter()
        lr = lr_at(epoch, tr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.sampler.epoch = epoch
        model.train()
        loss_fn.train()
        loss_fn.start_epoch(epoch)
        tally = StepTally(scaler, tr["amp"], tr["max_skipped_steps"], state, SYNC_EVERY.get(device.type, 1))
        share = None
        for step, (images, labels, views) in enumerate(train_loader):
            x, y = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            views = views.to(device, non_blocking=True)  # (dataset index, dy, dx, flip): for CRD and the cache
            # The gradient share needs a second backward on one step's graph, which a compiled
            # backward cannot give (its buffers are donated): that step runs eagerly.
            measure_share = step == 0 and distilled
            with autocast():
                student_out = (model if measure_share else forward)(x)
                with torch.no_grad():
                    teacher_out = teacher_outputs(x, views)
                ce = F.cross_entropy(student_out[-1].float(), y, label_smoothing=tr["label_smoothing"])
                terms = {"ce": ce, **loss_fn(student_out, teacher_out, y, views[:, 0])}
                method_loss = method_weight * sum(v for k, v in terms.items() if k != "ce")
                loss = ce_weight * ce + method_loss
            optimizer.zero_grad(set_to_none=True)
            if measure_share:
                share = backward_with_share(scaler, loss, method_loss, student_params)
            else:
                scaler.scale(loss).backward()
            figures = step_figures(terms, loss, student_out[-1], y, params, scaler, optimizer)  # sets found_inf
            scaler.step(optimizer)
            scaler.update()
            problem = tally.add(step, list(terms), figures, len(y), last=step + 1 == len(train_loader))
            if problem:
                stop(record, run_dir, f"{guard_where(run, epoch, problem[0])}: {problem[1]}"
                                      f"{share_note(share, run['method'])} The last good checkpoint is kept.")
            if show_bar and not tally.pending:  # after each read
                print(f"\r  epoch {epoch + 1} step {step + 1}/{len(train_loader)} loss {tally.last_loss:.4f}",
                      end="", file=sys.stderr, flush=True)
        if show_bar:
            print("\r", end="", file=sys.stderr)

        if tally.skipped > len(train_loader) // 2:
            stop(record, run_dir, f"health guard: method {run['method']!r}, epoch {epoch + 1}: the fp16 GradScaler "
                 f"skipped {tally.skipped} of {len(train_loader)} optimizer steps.{share_note(share, run['method'])} "
                 f"The last good checkpoint is kept.")
        test_loss, test_acc = evaluate(forward, test_loader, normalize, device, autocast)
        tally.add_epoch_to(history, test_loss=test_loss, test_acc=test_acc, lr=lr,
                           epoch_seconds=time.perf_counter() - t0, grad_share=share)
        log(epoch_line(epoch, tr["epochs"], history, run["method"]))
        check_weights_and_test_loss(record, run_dir, run, epoch, test_loss, model, loss_fn)
        # A CRD checkpoint is 55 MB: with short epochs, writing one every epoch loads a shared file
        # system for little (checkpoint_minutes bounds the work a kill can lose instead).
        due = time.monotonic() - saved_at >= 60 * tr["checkpoint_minutes"]
        if epoch + 1 < tr["epochs"] and due:
            save_checkpoint(checkpoint_path, checkpoint(run_fingerprint, identity, epoch + 1, False, model,
                                                        loss_fn, optimizer, scaler, state))
            atomic_write_json(run_dir / "progress.json", record("running"))
            saved_at = time.monotonic()

    # Completion (the weights were checked above): final weights and their checksum, then
    # metrics.json (the mark), then a checkpoint marked finished, from which a rerun by the
    # same code rewrites these outputs, and only then progress.json "complete". A kill in between
    # resumes from the last checkpoint; until the finished checkpoint is written, progress.json
    # still says "running" at that checkpoint, so that Ctrl-C or SIGTERM there marks it interrupted
    # (a "complete" written before it made the resume take them for a SIGKILL).
    save_weights(run_dir / "model.pth", model.state_dict())
    if "provenance" not in state:
        prov["finished"] = now()
        state["provenance"] = prov
    atomic_write_json(run_dir / "metrics.json", record("complete"))
    save_checkpoint(checkpoint_path, checkpoint(run_fingerprint, identity, tr["epochs"], True, model, loss_fn,
                                                optimizer, scaler, state))
    atomic_write_json(run_dir / "progress.json", record("complete"))
    previous_path(checkpoint_path).unlink(missing_ok=True)  # a finished run has nothing to fall back to
    log(f"done: best test accuracy {max(history['test_acc']):.2f}%, last {history['test_acc'][-1]:.2f}%")
    return record("complete")


def run_provenance(state, ckpt, here, run, stopped_by=None):
    """The provenance a run records, `here` being this process's. Each process that trained
    part of the run is on record: the one that started it, then every resume (another node,
    PBS job, thread count or runtime setting; even other code, which an unfinished checkpoint
    does not refuse), with how the process before it stopped. A finished run whose outputs are
    rewritten keeps its training's."""
    if "provenance" in state:
        return {**state["provenance"], "outputs_rewritten": {"at": now(), **{
            k: here[k] for k in ("host", "git_commit", "pbs_job_id")}}}
    state.setdefault("config", run)
    if ckpt and "provenance_at_start" not in state:  # of an earlier kdlab: of its start only the code is known
        state["provenance_at_start"] = {**dict.fromkeys(here), "started": state["started"],
                                        "code_sha256": ckpt.get("code_sha256"),
                                        **{k: here[k] for k in ("data_sha256", "fingerprint", "inputs_sha256")}}
    state.setdefault("provenance_at_start", here)
    if ckpt:
        if ckpt.get("code_sha256") != here["code_sha256"]:
            log(f"WARNING: the checkpoint was written by other code (kdlab or torch changed): its {ckpt['epoch']} "
                f"epoch(s) and the rest of this run come from different code (provenance.resumes)")
        state.setdefault("resumes", []).append({"epoch": ckpt["epoch"], "at": now(), "after": stopped_by, **{
            k: v for k, v in here.items() if k not in START_ONLY_KEYS}})
    return {**state["provenance_at_start"], "resumes": state.get("resumes", [])}


def teacher_source(run, teacher, teacher_sha256, arrays, device, compile_teacher):
    """(f(images, views) -> the frozen teacher's outputs for a batch, "cache" or "live"): from the cache
    where it applies."""
    if teacher is None:
        return (lambda x, views: None), None
    reason, path = why_not_cached(run), cache_path(run["teacher_weights"])
    if reason is None and not path.exists():  # by hand; in the workflow the cache is an input
        reason = f"there is no cache at {path} (kdlab cache-teacher builds it)"
    if reason is None:
        cache = TeacherCache(path, cache_key(run["teacher"], teacher_sha256, arrays), device)
        log(f"teacher outputs (logits, embedding) from the cache {path}")
        return (lambda x, views: cache(views)), "cache"
    log(f"teacher runs live: {reason}")
    forward = torch.compile(teacher) if compile_teacher else teacher
    return (lambda x, views: forward(x)), "live"


def checkpoint(run_fingerprint, identity, epoch, finished, model, loss_fn, optimizer, scaler, state):
    # The learning rate is a pure function of the epoch, so there is no scheduler state to keep.
    return {"fingerprint": run_fingerprint, **identity, "epoch": epoch, "finished": finished,
            "model": model.state_dict(), "method": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "state": state}


def read_progress(run_dir):
    """progress.json as a dict, or None where it is missing, unreadable or damaged (marking a damaged
    one interrupted would give it a checksum that kdlab results then trusts)."""
    try:
        record = json.loads((Path(run_dir) / "progress.json").read_text())
        return record if isinstance(record, dict) and json_intact(record) else None
    except (OSError, ValueError):  # json_intact raises ValueError for a NaN that strict JSON lacks
        return None


def mark_interrupted(run_dir, cause):
    """progress.json of a run stopped from outside (Ctrl-C, SIGTERM) or by an error says so: it said
    "running" since the run's last checkpoint (or its resume), or still names what stopped the process
    before, when this one stopped before it wrote "running". Nothing to mark before the first
    checkpoint's file or after the run finished or failed."""
    record = read_progress(run_dir)
    if record and record.get("status") in ("running", "interrupted"):
        record.update(status="interrupted", error=f"interrupted by {cause}; running it again resumes from its "
                                                  f"checkpoint at epoch {record.get('epochs_done')}")
        atomic_write_json(Path(run_dir) / "progress.json", record)


def why_it_stopped(run_dir):
    """How the process that wrote a run's progress.json stopped, read before a resume replaces it:
    a retried job's log replaces the log of the attempt before, and a run's history should say
    what cut it short. None where progress.json is missing or unreadable."""
    record = read_progress(run_dir) or {}
    status = record.get("status")
    if status in ("interrupted", "failed"):
        return record.get("error")
    if status in ("running", "complete"):  # Ctrl-C, SIGTERM and errors mark the run interrupted; "complete"
        # with an unfinished checkpoint: written by code that wrote it before the finished checkpoint
        return "killed without a chance to say why (SIGKILL: the kernel's out-of-memory killer, PBS past its " \
               "grace time after SIGTERM, a node failure)"
    return None


def epoch_line(epoch, epochs, h, method):
    terms = " ".join(f"{k} {v[-1]:.4f}" for k, v in h["terms"].items())
    share = f" | grad share {method} {100 * h['grad_share'][-1]:.0f}%" if h["grad_share"][-1] is not None else ""
    skipped = f" | skipped {h['skipped_steps'][-1]}" if h["skipped_steps"][-1] else ""
    seconds = h["epoch_seconds"][-1]
    left = int(seconds * (epochs - epoch - 1))
    eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return (f"epoch {epoch + 1}/{epochs} | loss {h['train_loss'][-1]:.4f} ({terms}) | train {h['train_acc'][-1]:.2f}% "
            f"| test {h['test_loss'][-1]:.4f} {h['test_acc'][-1]:.2f}% (best {max(h['test_acc']):.2f}%) "
            f"| lr {h['lr'][-1]:.4g}{share}{skipped} | {seconds:.1f}s | ETA {eta}")
