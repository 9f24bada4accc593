"""Factor Transfer stage 1: pre-train the paraphraser on the frozen teacher's features."""

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError, fingerprint, resolve_run
from .data import load_dataset, make_loaders
from .methods.ft import Paraphraser
from .runio import (code_sha256, file_sha256, on_cpu, previous_path, remove_temporaries, save_checked,
                    save_checkpoint)
from .guard import GuardError, nonfinite_tensors, some
from .train import Normalize, load_frozen_teacher, load_resume_state, log, pick_device, seed_everything


def pretrain_paraphraser(run, out_path, force_restart=False):
    run = resolve_run(run)
    if run["kind"] != "paraphraser" or run["method"] != "ft":
        raise ConfigError("config keys 'kind' and 'method': a paraphraser run has kind 'paraphraser' and method 'ft'")
    settings, tr = run["method_settings"], run["training"]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_path.parent)  # from writes that a kill interrupted
    device = pick_device(tr["device"])
    seed_everything(run["seed"], tr["deterministic"])
    arrays = load_dataset(run["data"])
    loader, _ = make_loaders(arrays, tr["batch_size"], tr["num_workers"], run["seed"], device.type == "cuda",
                             augmentation=run["data"]["augmentation"])
    normalize = Normalize(arrays.mean, arrays.std, device)
    teacher = load_frozen_teacher(run, arrays.num_classes, device)
    paraphraser = Paraphraser(settings["rate"]).to(device)
    optimizer = torch.optim.SGD(paraphraser.parameters(), lr=settings["paraphraser_lr"], momentum=0.9,
                                weight_decay=tr["weight_decay"])
    reconstruction = F.l1_loss if settings["paraphraser_loss"] == "l1" else F.mse_loss
    teacher_hash = file_sha256(run["teacher_weights"])
    run_fingerprint = fingerprint(run, {"teacher_weights": teacher_hash})

    # Resumable per epoch, like every run: a small checkpoint next to the output. A checkpoint of
    # other data is not resumed; a finished one of the same code rewrites paraphraser.pth without
    # training (Snakemake reruns the job after a hard kill, or when the teacher's weights were rewritten).
    checkpoint_path = out_path.with_name("paraphraser.checkpoint.pth")
    identity = {"data_sha256": arrays.sha256(), "code_sha256": code_sha256()}
    ckpt = load_resume_state(checkpoint_path, run_fingerprint, force_restart, identity)
    losses = []
    if ckpt:
        paraphraser.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        losses = ckpt["losses"]
        if not ckpt["finished"]:
            log(f"resuming the paraphraser from epoch {len(losses)}")
    else:  # a stale paraphraser.pth must not outlive a retrain that a kill interrupts
        out_path.unlink(missing_ok=True)

    epochs = settings["paraphraser_epochs"]
    state = lambda finished: {"fingerprint": run_fingerprint, **identity, "finished": finished,  # noqa: E731
                              "state_dict": paraphraser.state_dict(), "optimizer": optimizer.state_dict(),
                              "losses": losses}
    for epoch in range(len(losses), epochs):
        loader.sampler.epoch = epoch
        paraphraser.train()
        total, seen = 0.0, 0
        for images, _, _ in loader:
            with torch.no_grad():
                features = teacher(normalize(images.to(device, non_blocking=True)))[2]
            loss = reconstruction(paraphraser(features), features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
            if not torch.isfinite(torch.tensor(value)):
                raise GuardError(f"health guard: ft paraphraser, epoch {epoch + 1}: the reconstruction loss "
                                 f"went non-finite")
            optimizer.step()
            total, seen = total + value * len(images), seen + len(images)
        losses.append(total / seen)
        log(f"paraphraser epoch {epoch + 1}/{epochs} | {settings['paraphraser_loss']} reconstruction "
            f"{losses[-1]:.5f}")
        bad = nonfinite_tensors(paraphraser)
        if bad:  # never saved: the previous checkpoint stays
            raise GuardError(f"health guard: ft paraphraser, epoch {epoch + 1}: {len(bad)} weight tensor(s) went "
                             f"non-finite ({some(bad)}) after the optimizer step")
        if epoch + 1 < epochs:
            save_checkpoint(checkpoint_path, state(False))
    save_checked(out_path, {"state_dict": on_cpu(paraphraser.state_dict()), "settings": settings,
                            "teacher_weights_sha256": teacher_hash, "reconstruction_loss": losses})
    save_checkpoint(checkpoint_path, state(True))
    previous_path(checkpoint_path).unlink(missing_ok=True)
    log(f"saved {out_path}")
