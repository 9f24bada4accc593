"""kdlab's training loop against a bare PyTorch loop: same model, data, loaders and epochs.

The bare loop has none of kdlab's per-step bookkeeping (the loss terms and guard figures
read to the host every step on the CPU, every 50 on CUDA; gradient-norm check, per-epoch
log line). kdlab runs in NCHW here, as the bare loop (bench_classic.py measures the
layout and the other levers). Both time
train + evaluate per epoch; kdlab's checkpoint and progress writes come after its
epoch timer and are not in the figure. The ratio is the price of the bookkeeping.

    .venv/bin/python bench/bench_train.py [--model ResNet20] [--device auto] [--amp off|bf16|fp16]
"""

import argparse
import contextlib
import io
import tempfile
import time

import torch
import torch.nn.functional as F

from kdlab.data import make_loaders, make_synthetic
from kdlab.models import build_model
from kdlab.train import AMP_DTYPES, Normalize, evaluate, pick_device, train


def bare_loop(args, device):
    arrays = make_synthetic(10, args.train_size, 500, seed=0)
    loader, test_loader = make_loaders(arrays, args.batch_size, args.workers, 0, device.type == "cuda")
    normalize = Normalize(arrays.mean, arrays.std, device)
    torch.manual_seed(0)
    model = build_model(args.model, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    dtype = AMP_DTYPES.get(args.amp)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    seconds = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loader.sampler.epoch = epoch
        model.train()
        for images, labels, _ in loader:
            x, y = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(model(x)[-1].float(), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        evaluate(model, test_loader, normalize, device, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def kdlab_loop(args, device):
    run = {"kind": "teacher", "model": args.model, "seed": 0, "method": "none",
           "data": {"dataset": "Synthetic", "synthetic": {"num_classes": 10, "train_size": args.train_size,
                                                          "test_size": 500, "seed": 0}},
           "training": {"epochs": args.epochs, "batch_size": args.batch_size, "num_workers": args.workers,
                        "device": str(device), "amp": args.amp, "milestones": [args.epochs + 1],
                        "channels_last": False}}
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        return train(run, run_dir)["history"]["epoch_seconds"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ResNet20")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                        help="the same autocast (and GradScaler for fp16) in both loops")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    # Alternate the two, twice, and keep each one's best epoch after the first (warm-up).
    best = {"bare": float("inf"), "kdlab": float("inf")}
    for _ in range(2):
        best["bare"] = min(best["bare"], min(bare_loop(args, device)[1:]))
        best["kdlab"] = min(best["kdlab"], min(kdlab_loop(args, device)[1:]))
    images = args.train_size + 500
    print(f"{args.model} on {device}, amp {args.amp}, {args.train_size} train + 500 test images per epoch, "
          f"batch {args.batch_size}")
    for name in ("bare", "kdlab"):
        print(f"  {name:6s} {best[name]:7.3f} s/epoch  {images / best[name]:8.0f} images/s")
    print(f"  kdlab / bare time ratio: {best['kdlab'] / best['bare']:.3f}")
    return best


if __name__ == "__main__":
    main()
