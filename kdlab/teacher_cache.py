"""The exact teacher-output cache: a frozen teacher's logits and embedding for every view.

With the default augmentation (zero padding 4, random 32x32 crop, horizontal flip or
not) a training image has exactly (2*4+1)^2 * 2 = 162 views, and a frozen teacher in
eval mode gives each view the same outputs every epoch. `kdlab cache-teacher` computes
them once per teacher (in float32) and stores them in float16 beside the teacher's
weights; distill runs of methods that need only the teacher's logits and pooled
embedding (a method module's TEACHER_OUTPUTS = "logits+embedding") read them instead
of running the teacher. float16 keeps 11 significant bits: each output is off by at
most 2^-11 of itself (tests/test_speed.py checks a relative error <= 1e-3); values that
would overflow float16 stop the build.

File: {"key": what it was computed from, "outputs": float16 (images, 162, classes + 64)},
the last axis holding the logits then the embedding. CIFAR-100: 50000 x 162 x 164 x 2
bytes = 2.66 GB. The key (teacher weights' sha256, the training images' and labels'
sha256, the augmentation) is checked when a run loads the file.
"""

import hashlib
import time
from pathlib import Path

import torch

from .data import DEFAULT_AUGMENTATION, PAD
from .methods import get_method
from .models import EMBEDDING_DIM
from .runio import atomic_write, torch_load

SIDE = 2 * PAD + 1  # crop offsets 0..2*PAD on each axis
NUM_VIEWS = SIDE * SIDE * 2
FORMAT = 1
FILE_NAME = "teacher_cache.pth"


class TeacherCacheError(RuntimeError):
    """The cache file does not belong to this teacher, data or augmentation."""


def cache_path(teacher_weights):
    """Where the cache of a teacher lives: beside its weights."""
    return Path(teacher_weights).with_name(FILE_NAME)


def view_ids(views):
    """(index, dy, dx, flip) rows -> the view's number in 0..161."""
    return (views[:, 1] * SIDE + views[:, 2]) * 2 + views[:, 3]


def why_not_cached(run):
    """None if a (resolved) distill run can read the cache, else the reason it runs the teacher live."""
    method = get_method(run["method"])
    if run["kind"] != "distill" or not method.NEEDS_TEACHER:
        return "no teacher"
    if not run["training"].get("teacher_cache", True):
        return "training.teacher_cache is false"
    if getattr(method, "TEACHER_OUTPUTS", None) != "logits+embedding":
        return f"method {run['method']!r} needs the teacher's intermediate features"
    augmentation = {**DEFAULT_AUGMENTATION, **(run["data"].get("augmentation") or {})}
    if augmentation != DEFAULT_AUGMENTATION:
        return f"the augmentation {augmentation} is not the default {DEFAULT_AUGMENTATION}"
    return None


def cache_key(teacher_name, teacher_sha256, arrays):
    data = hashlib.sha256(arrays.train_x.tobytes())
    data.update(arrays.train_y.tobytes())
    return {"format": FORMAT, "teacher": teacher_name, "teacher_sha256": teacher_sha256,
            "data_sha256": data.hexdigest(), "num_images": len(arrays.train_x), "num_classes": arrays.num_classes,
            "augmentation": DEFAULT_AUGMENTATION, "num_views": NUM_VIEWS}


def all_views(images):
    """uint8 NCHW images -> every view, as the loader makes them, in view-id order."""
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    for dy in range(SIDE):
        for dx in range(SIDE):
            crop = padded[:, :, dy:dy + 32, dx:dx + 32]
            yield crop
            yield crop.flip(3)


@torch.inference_mode()
def compute_outputs(teacher, arrays, normalize, device, batch_size, log=print):
    """float16 (images, NUM_VIEWS, classes + EMBEDDING_DIM): the teacher's float32 outputs, rounded."""
    n = len(arrays.train_x)
    outputs = torch.empty((n, NUM_VIEWS, arrays.num_classes + EMBEDDING_DIM), dtype=torch.float16)
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        images = torch.from_numpy(arrays.train_x[start:start + batch_size]).permute(0, 3, 1, 2).to(device)
        rows = torch.stack([torch.cat([logits.float(), embedding.float()], 1)
                            for *_, embedding, logits in map(teacher, map(normalize, all_views(images)))], 1)
        half = rows.half()
        if not torch.isfinite(half).all():
            raise TeacherCacheError(f"teacher outputs overflow float16 (largest {rows.abs().max():.3g})")
        outputs[start:start + len(images)] = half.cpu()
        done = min(start + batch_size, n)
        if done == n or start // batch_size % 20 == 0:
            rate = done * NUM_VIEWS / (time.perf_counter() - started)
            log(f"  {done}/{n} images x {NUM_VIEWS} views, {rate:.0f} teacher forwards/s")
    return outputs


def save(path, obj):
    """torch.save straight to a temporary file, then rename (no in-memory copy of GBs)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def build(run, weights, out, log=print):
    """`kdlab cache-teacher`: evaluate the teacher `run['model']` on every view of the training set."""
    from .config import resolve_run
    from .data import load_dataset
    from .runio import file_sha256
    from .train import Normalize, load_frozen_teacher, pick_device
    run = resolve_run(run)
    tr = run["training"]
    device = pick_device(tr["device"])
    arrays = load_dataset(run["data"])
    teacher = load_frozen_teacher({"teacher": run["model"], "teacher_weights": weights}, arrays.num_classes, device,
                                  tr["channels_last"])
    normalize = Normalize(arrays.mean, arrays.std, device, tr["channels_last"])
    key = cache_key(run["model"], file_sha256(weights), arrays)
    log(f"caching {run['model']} ({weights}) on {len(arrays.train_x)} images x {NUM_VIEWS} views, device {device}")
    started = time.perf_counter()
    outputs = compute_outputs(teacher, arrays, normalize, device, tr["eval_batch_size"], log)
    save(out, {"key": key, "outputs": outputs})
    log(f"wrote {out}: {outputs.numel() * 2 / 1e9:.3f} GB in {time.perf_counter() - started:.1f}s")


class TeacherCache:
    """Reads a cache file, checks its key, and answers a batch's views with (embedding, logits)."""

    def __init__(self, path, expected_key, device):
        saved = torch_load(path, mmap=True)
        key = saved.get("key", {}) if isinstance(saved, dict) else {}
        if key != expected_key:
            differs = sorted(k for k in expected_key if key.get(k) != expected_key[k])
            raise TeacherCacheError(f"teacher cache {path} was computed from another {', '.join(differs)}; "
                                    f"rebuild it (kdlab cache-teacher, or let snakemake do it)")
        self.outputs = saved["outputs"].to(device)  # 2.66 GB for CIFAR-100: on the GPU, gathers stay there
        self.num_classes = expected_key["num_classes"]

    def __call__(self, views):
        """The teacher's (embedding, logits) in float32 for a batch's views (int64, on any device)."""
        views = views.to(self.outputs.device, non_blocking=True)
        rows = self.outputs[views[:, 0], view_ids(views)].float()
        return rows[:, self.num_classes:], rows[:, :self.num_classes]
