"""What a grid writes to and reads from the shared file system, from its config alone (no data, no GPU).

Run: ``.venv/bin/python bench/bench_io.py [config/config.yaml ...] [--train-size 50000]``

For every training run of the grid it builds the student and its method's state as
``kdlab train`` does (fused-SGD momentum included; CRD's memory banks over
``--train-size`` samples) and measures the checkpoint that is written after every epoch,
then adds up: checkpoint bytes over all epochs (an upper bound for runs with
``training.checkpoint_minutes``, which the config alone cannot turn into epochs), the
final files that stay, the teacher caches (built once: their parts, then the file) and
the cache reads of the runs that use them. It also times ``save_checkpoint`` (content
SHA-256, temporary file, fsync, rename, hard link of the previous) for the grid's largest
checkpoint on the disk of ``--dir``.
Not counted: progress.json (a few KB per epoch), the FT paraphrasers' stage 1 (under 1 MB
per epoch), logs.
"""

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdlab.config import read_yaml, resolve_grid, resolve_run  # noqa: E402
from kdlab.grid import expand_grid  # noqa: E402
from kdlab.loss import build_loss  # noqa: E402
from kdlab.methods import ft  # noqa: E402
from kdlab.models import EMBEDDING_DIM, build_model  # noqa: E402
from kdlab.runio import save_checked, save_checkpoint  # noqa: E402
from kdlab.teacher_cache import NUM_VIEWS, why_not_cached  # noqa: E402
from kdlab.train import checkpoint, fused_sgd  # noqa: E402

TRAINING_RULES = ("train_teacher", "train_student", "distill")
FILES_PER_RUN = 5  # checkpoint.pth, progress.json, model.pth, model.pth.sha256, metrics.json (docs/run-files.md)


def num_classes(data):
    """The grid's classes, from its resolved config alone (npz grids must name them)."""
    if data["dataset"] == "Synthetic":
        return data["synthetic"]["num_classes"]
    if data["dataset"] == "npz":
        if not data["num_classes"]:
            sys.exit("bench_io: an npz grid without data.num_classes: set it to estimate its files")
        return data["num_classes"]
    return {"Cifar10": 10, "Cifar100": 100}[data["dataset"]]


def checkpoint_of(run, classes, train_size, scratch):
    """What train.checkpoint() saves after an epoch of `run`: weights, method state, optimizer."""
    labels = np.arange(train_size) % classes
    if run["method"] == "ft":
        run["paraphraser"] = str(scratch / "paraphraser.pth")
        save_checked(run["paraphraser"], {"state_dict": ft.Paraphraser(run["method_settings"]["rate"]).state_dict(),
                                          "settings": run["method_settings"]})
        run["teacher_weights"] = None
    model = build_model(run["model"], classes)
    loss = build_loss(run, labels)
    params = list(model.parameters()) + [p for p in loss.parameters() if p.requires_grad]
    optimizer = fused_sgd(params, run["training"])  # its momentum buffers as training makes them
    return checkpoint("", {}, 1, False, model, loss, optimizer, torch.amp.GradScaler("cpu", enabled=False), {})


def size_of(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def report(config, train_size, scratch):
    grid = resolve_grid(read_yaml(config))
    classes = num_classes(grid["data"])
    jobs = expand_grid(grid)
    cache_bytes = train_size * NUM_VIEWS * (classes + EMBEDDING_DIM) * 2
    sizes, written, kept, runs, cache_reads, largest, spaced = {}, 0, 0, 0, 0, (0, None), 0
    for job in jobs:
        if job.rule not in TRAINING_RULES:
            continue
        run = resolve_run(job.run)
        key = (run["model"], run["method"], repr(run["method_settings"]), repr(run.get("additive")))
        if key not in sizes:
            obj = checkpoint_of(dict(run), classes, train_size, scratch)
            sizes[key] = (size_of(obj), size_of(obj["model"]))
            if sizes[key][0] > largest[0]:
                largest = (sizes[key][0], obj)
        checkpoint, weights = sizes[key]
        written += checkpoint * run["training"]["epochs"]  # at most: checkpoint_minutes may space them
        spaced += run["training"]["checkpoint_minutes"] > 0
        kept += checkpoint + weights
        runs += 1
        cache_reads += cache_bytes if run["kind"] == "distill" and why_not_cached(run) is None else 0
    caches = sum(job.rule == "cache_teacher" for job in jobs)
    counts = {}
    for job in jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    gb = 1e9
    print(f"{config}: {len(jobs)} jobs ({', '.join(f'{n} {r}' for r, n in counts.items())}); {classes} classes, "
          f"{train_size} training images")
    low, high = min(s for s, _ in sizes.values()), max(s for s, _ in sizes.values())
    print(f"  checkpoint per epoch: {low / 1e6:.2f} .. {high / 1e6:.2f} MB; over all {runs} training runs' epochs "
          f"{written / gb:.1f} GB written ({written / runs / gb:.2f} GB per run)"
          + (f"; at most: {spaced} runs checkpoint only every training.checkpoint_minutes" if spaced else ""))
    print(f"  teacher caches: {caches} x {cache_bytes / gb:.2f} GB, written twice each (parts, then the file): "
          f"{2 * caches * cache_bytes / gb:.1f} GB; read by the runs that use them: {cache_reads / gb:.1f} GB")
    print(f"  left on disk: finished checkpoints + final weights {kept / gb:.2f} GB, caches "
          f"{caches * cache_bytes / gb:.2f} GB; {runs * FILES_PER_RUN} files in the training runs' directories")
    return largest[1]


def time_save(obj, directory):
    path = Path(directory) / "checkpoint.pth"
    times = []
    for _ in range(3):
        start = time.perf_counter()
        save_checkpoint(path, obj)
        times.append(time.perf_counter() - start)
    print(f"save_checkpoint of the largest checkpoint ({path.stat().st_size / 1e6:.1f} MB) in {directory}: "
          f"best of 3 {min(times):.3f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["config/config.yaml"])
    parser.add_argument("--train-size", type=int, default=50000, help="training images (CIFAR: 50000)")
    parser.add_argument("--dir", default=None, help="where to time save_checkpoint (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        largest = None
        for config in args.configs:
            obj = report(config, args.train_size, Path(scratch))
            if largest is None or size_of(obj) > size_of(largest):
                largest = obj
        time_save(largest, args.dir or scratch)


if __name__ == "__main__":
    main()
