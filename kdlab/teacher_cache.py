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

File: {"key": what it was computed from, "outputs": float16 (images, 162, classes + 64),
"outputs_sha256": the outputs' checksum}, the last axis holding the logits then the
embedding. CIFAR-100: 50000 x 162 x 164 x 2 bytes = 2.66 GB. When a run loads the file it
checks the key (teacher weights' sha256, the training images' and labels' sha256, the
augmentation), then the checksum, so that a damaged file is refused instead of silently
changing results (SHA-256 streams at about 1.4 GB/s with SHA-NI: ~2 s for CIFAR-100).

A build saves its outputs part by part in .teacher_cache.pth.parts/ beside the file (each
part keyed and checksummed like the cache) and removes them once the file is written: a
killed build, run again, resumes at its first missing part. It also removes the
.teacher_cache.pth.*.tmp that a build killed during its final write leaves. A finished
build keeps a hard link to its file, .teacher_cache.pth.kept (no disk space of its own
while the file exists): Snakemake reruns the build whenever the teacher's job reran, even
when that rewrote identical weights, and deletes the file first; a build whose key the
kept file matches, checked like any cache, links it back instead of computing again.
"""

import hashlib
import os
import shutil
import time
from pathlib import Path

import torch

from .data import DEFAULT_AUGMENTATION, PAD
from .methods import get_method
from .models import EMBEDDING_DIM
from .runio import UnreadableFile, atomic_write, remove_temporaries, torch_load

SIDE = 2 * PAD + 1  # crop offsets 0..2*PAD on each axis
NUM_VIEWS = SIDE * SIDE * 2
FORMAT = 1
FILE_NAME = "teacher_cache.pth"
CHUNK_BYTES = 64 << 20  # what the checksum reads (and copies to the GPU) at a time
PART_BYTES = 64 << 20  # a build saves its work every ~1260 CIFAR-100 images (~8 of a CPU build's ~340 minutes)
REBUILD = "rebuild it with `kdlab cache-teacher`, or delete it and run snakemake again (rule cache_teacher rebuilds it)"


class TeacherCacheError(RuntimeError):
    """The cache file is unreadable, damaged, or does not belong to this teacher, data or augmentation."""


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
    return {"format": FORMAT, "teacher": teacher_name, "teacher_sha256": teacher_sha256,
            "data_sha256": arrays.sha256(("train",)), "num_images": len(arrays.train_x),
            "num_classes": arrays.num_classes,
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
def compute_outputs(teacher, train_x, num_classes, normalize, device, batch_size, log=print):
    """float16 (images, NUM_VIEWS, classes + EMBEDDING_DIM): the teacher's float32 outputs on
    the uint8 NHWC images `train_x`, rounded."""
    n = len(train_x)
    outputs = torch.empty((n, NUM_VIEWS, num_classes + EMBEDDING_DIM), dtype=torch.float16)
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        images = torch.from_numpy(train_x[start:start + batch_size]).permute(0, 3, 1, 2).to(device)
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


def outputs_sha256(outputs, copy_to=None):
    """SHA-256 of the outputs' dtype, shape and bytes, read once in chunks (no second copy of
    GBs); each chunk is also copied into `copy_to` if given, so that verifying a cache and
    moving it to the GPU read the file once."""
    h = hashlib.sha256(f"{outputs.dtype}{tuple(outputs.shape)}:".encode())
    data = outputs.reshape(-1).view(torch.uint8)
    target = None if copy_to is None else copy_to.view(-1).view(torch.uint8)
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = data[start:start + CHUNK_BYTES]
        h.update(chunk.numpy())
        if target is not None:
            target[start:start + CHUNK_BYTES].copy_(chunk)
    return h.hexdigest()


def save(path, obj):
    """torch.save of {"key", "outputs"} with the outputs' checksum added, straight to a temporary
    file, then rename (no in-memory copy of GBs)."""
    outputs = obj["outputs"].contiguous()
    obj = {**obj, "outputs": outputs, "outputs_sha256": outputs_sha256(outputs)}
    atomic_write(path, lambda f: torch.save(obj, f))  # an OSError naming the file if it cannot be written


def build(run, weights, out, log=print):
    """`kdlab cache-teacher`: evaluate the teacher `run['model']` on every view of the training set."""
    from .config import resolve_run
    from .data import load_dataset
    from .train import Normalize, checked_teacher_weights, load_frozen_teacher, pick_device
    run, out = resolve_run(run), Path(out)
    for stale in remove_temporaries(out.parent, out.name):  # a killed build's full-size file
        log(f"removed {stale}, left by an interrupted build")
    tr = run["training"]
    device = pick_device(tr["device"])
    arrays = load_dataset(run["data"])
    # The weights checked first: damaged, their other checksum would make the kept file of the intact
    # ones look foreign, and it would be removed.
    key, kept = cache_key(run["model"], checked_teacher_weights(weights), arrays), kept_path(out)
    if reuse_kept(kept, key, out, log):
        return
    teacher = load_frozen_teacher({"teacher": run["model"], "teacher_weights": weights}, arrays.num_classes, device,
                                  tr["channels_last"])
    normalize = Normalize(arrays.mean, arrays.std, device, tr["channels_last"])
    log(f"caching {run['model']} ({weights}) on {len(arrays.train_x)} images x {NUM_VIEWS} views, device {device}")
    started, parts = time.perf_counter(), parts_dir(out)
    outputs = compute_in_parts(teacher, arrays, normalize, device, tr["eval_batch_size"], key, parts, log)
    save(out, {"key": key, "outputs": outputs})
    shutil.rmtree(parts, ignore_errors=True)
    log(f"wrote {out}: {outputs.numel() * 2 / 1e9:.3f} GB in {time.perf_counter() - started:.1f}s")
    try:
        os.link(out, kept)
    except OSError as e:  # a file system without hard links: the next rerun computes again
        log(f"could not keep a link to {out} for a rerun of this build ({e})")


def kept_path(out):
    """The hard link a finished build keeps to its file (see the module's docstring)."""
    return Path(out).with_name(f".{Path(out).name}.kept")


def reuse_kept(kept, key, out, log):
    """Link the kept file of an earlier build back to `out` if it belongs to `key` and is intact
    (the checksum of every output is checked); else remove it. Whether it was reused."""
    if not kept.exists():
        return False
    try:
        TeacherCache(kept, key, "cpu")
    except TeacherCacheError as e:
        log(f"not reusing the earlier build's file: {e}")
        kept.unlink()
        return False
    try:
        if not (out.exists() and os.path.samefile(kept, out)):
            out.unlink(missing_ok=True)  # a kill from here to the link leaves `kept` for the next build
            os.link(kept, out)
    except OSError as e:  # e.g. protected_hardlinks and a file of another user: compute it
        log(f"could not link {kept} back to {out} ({e}): computing the cache again")
        return False
    log(f"wrote {out}: the file of an earlier build from the same teacher weights, data and augmentation, "
        f"kept as {kept} and checked")
    return True


def parts_dir(out):
    """Where a build keeps the parts it has computed until it has written `out`."""
    return Path(out).with_name(f".{Path(out).name}.parts")


def compute_in_parts(teacher, arrays, normalize, device, batch_size, key, parts, log=print):
    """compute_outputs, part by part of about PART_BYTES, each part saved in `parts` (atomically, with
    its checksum) once done, so that a build killed midway resumes at its first missing part; a
    part that is damaged or was computed from another teacher or data is computed again."""
    n, width = len(arrays.train_x), arrays.num_classes + EMBEDDING_DIM
    per_part = max(1, PART_BYTES // (NUM_VIEWS * width * 2))
    outputs = torch.empty((n, NUM_VIEWS, width), dtype=torch.float16)
    remove_temporaries(parts)  # a part whose write was interrupted
    for start in range(0, n, per_part):
        stop = min(start + per_part, n)
        path, part_key = parts / f"{start:07d}-{stop:07d}.pth", {**key, "images": [start, stop]}
        done = read_part(path, part_key, log)
        if done is not None:
            outputs[start:stop] = done
            log(f"  images {start}..{stop} of {n}: read from {path} (an interrupted build computed them)")
            continue
        log(f"  images {start}..{stop} of {n}:")
        rows = compute_outputs(teacher, arrays.train_x[start:stop], arrays.num_classes, normalize, device,
                               batch_size, log)
        outputs[start:stop] = rows
        save(path, {"key": part_key, "outputs": rows})
    return outputs


def read_part(path, key, log):
    """A part's outputs if it exists, belongs to `key` and is intact, else None."""
    if not path.exists():
        return None
    try:
        return TeacherCache(path, key, "cpu").outputs
    except TeacherCacheError as e:
        log(f"  computing it again: {e}")
        return None


def load(path):
    """The file's dict, memory-mapped, checked for its layout; TeacherCacheError naming the file if it is
    unreadable."""
    path = Path(path)
    with open(path, "rb") as f:  # torch's own message for a file that is no zip archive is about mmap
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:
        what = "is empty" if path.stat().st_size == 0 else "is not a file written by kdlab cache-teacher"
        raise TeacherCacheError(f"teacher cache {path} {what}; {REBUILD}")
    try:
        saved = torch_load(path, mmap=True)
    except UnreadableFile as e:
        raise TeacherCacheError(f"teacher cache {e}; {REBUILD}") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("key"), dict)
            and isinstance(saved.get("outputs"), torch.Tensor)):
        raise TeacherCacheError(f"teacher cache {path} is not a file written by kdlab cache-teacher; {REBUILD}")
    if "outputs_sha256" not in saved:  # as for other files: loaded, not silently trusted, not rebuilt by force
        print(f"WARNING: teacher cache {path} was built before kdlab checksummed it; it cannot be verified "
              f"({REBUILD} to have it checked)", flush=True)
    return saved


class TeacherCache:
    """Reads a cache file, checks its key, and answers a batch's views with (embedding, logits)."""

    def __init__(self, path, expected_key, device):
        saved = load(path)
        key = saved["key"]
        if key != expected_key:
            differs = sorted(k for k in expected_key if key.get(k) != expected_key[k])
            raise TeacherCacheError(f"teacher cache {path} was computed from another {', '.join(differs)}; {REBUILD}")
        outputs = saved["outputs"]  # memory-mapped: read only by the checksum below
        # 2.66 GB for CIFAR-100: on the GPU, gathers stay there; on the CPU, it stays mapped.
        self.outputs = outputs if torch.device(device).type == "cpu" else torch.empty_like(outputs, device=device)
        checksum = outputs_sha256(outputs, None if self.outputs is outputs else self.outputs)
        if checksum != saved.get("outputs_sha256", checksum):
            raise TeacherCacheError(f"teacher cache {path} is damaged: its outputs do not match their checksum; "
                                    f"{REBUILD}")
        self.num_classes = expected_key["num_classes"]

    def __call__(self, views):
        """The teacher's (embedding, logits) in float32 for a batch's views (int64, on any device)."""
        views = views.to(self.outputs.device, non_blocking=True)
        rows = self.outputs[views[:, 0], view_ids(views)].float()
        return rows[:, self.num_classes:], rows[:, :self.num_classes]
