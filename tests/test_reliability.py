"""Reliability (issue 10): no bad value, damaged file or non-finite weight gets through."""

import contextlib
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from kdlab.cli import main as kdlab_main
from kdlab.config import fingerprint, resolve_run, split_runtime
from kdlab.models import build_model
import kdlab.runio
from kdlab.runio import (UnreadableFile, atomic_write_json, content_sha256, json_sha256, exclusive, load_checked,
                         save_checkpoint, save_weights, verify_weights)
from kdlab.guard import GuardError
from kdlab.train import train

from conftest import REPO, comparable, interrupt_after_checkpoints, read_json, tiny_run
from test_config import BAD, bad_config, demo, tree

RELIABILITY_BAD = [name for name in BAD if any(word in name for word in (
    "nan", "inf", "absurd", "tiny", "leading dash", "brace", "newline", "tab", "duplicate pair", "crop", "horizontal"))]


def strict_json(path):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


# --- every value is checked before anything runs -----------------------------------

def test_check_config_rejects_each_bad_value_naming_the_key_and_creates_nothing(tmp_path, capsys, monkeypatch):
    assert len(RELIABILITY_BAD) >= 45
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in RELIABILITY_BAD:
        (configs / f"{abs(hash(name))}.yaml").write_text(yaml.safe_dump(bad_config(name)))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    for name in RELIABILITY_BAD:
        _, _, key, text = BAD[name]
        assert kdlab_main(["check-config", str(configs / f"{abs(hash(name))}.yaml")]) == 2, name
        err = capsys.readouterr().err
        assert f"config key '{key}'" in err and text in err and "Traceback" not in err, (name, err)
    assert tree(tmp_path) == before, "check-config created or changed files"


def test_check_config_cli_has_no_traceback_for_nan(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(demo()).replace("lr: 0.1", "lr: .nan"))
    result = subprocess.run([sys.executable, "-m", "kdlab", "check-config", str(bad)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "config key 'training.lr': must be a finite number" in result.stderr
    assert "Traceback" not in result.stderr and sorted(os.listdir(tmp_path)) == ["bad.yaml"]


@pytest.mark.parametrize("key,value", [("training.lr", float("nan")), ("training.label_smoothing", float("nan")),
                                       ("method_settings.rate", float("nan")), ("data.data_dir", "-data")])
def test_a_job_refuses_a_bad_value_at_start_naming_the_key(key, value, tmp_path, capsys):
    run = tiny_run()
    if key.startswith("method_settings"):
        run = tiny_run(kind="paraphraser", method="ft", teacher="ResNet8", teacher_weights="t.pth")
    block, name = key.split(".")
    run.setdefault(block, {})[name] = value
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--runtime", '{"training": 5}'], "--runtime: block 'training' must be a mapping"),
    (["--runtime", "[1]"], "--runtime must be a mapping of config keys"),
    (["--config", "[1]"], "--config must be a mapping of config keys"),
    (["--config", ""], "--config must be a mapping of config keys (inline JSON or a YAML/JSON file), not nothing"),
    (["--config", str(REPO / "config" / "demo.yaml")], "--config is an experiment grid"),
], ids=["runtime block", "runtime list", "config list", "config empty", "config a grid"])
def test_a_job_refuses_malformed_config_options(args, message, tmp_path, capsys):
    run = ["--config", json.dumps(tiny_run()), "--run-dir", str(tmp_path / "run")]
    for option, value in zip(args[::2], args[1::2]):
        if option in run:
            run[run.index(option) + 1] = value
        else:
            run += [option, value]
    assert kdlab_main(["train", *run]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_threads_must_be_a_positive_whole_number(threads, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        kdlab_main(["train", "--config", "{}", "--run-dir", str(tmp_path), "--threads", threads])
    assert stop.value.code == 2 and "argument --threads: must be a whole number of at least 1" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["cache-teacher", "--config", "{}", "--weights", "w.pth", "--out", "."], "argument --out: must name a file, "
                                                                              "and '.' is a directory"),
    (["pretrain-paraphraser", "--config", "{}", "--out", "."], "argument --out: must name a file"),
    (["train", "--config", "{}", "--run-dir", __file__], "argument --run-dir: '%s' is a file, not a directory"
     % __file__),
], ids=["cache into a directory", "paraphraser into a directory", "run dir a file"])
def test_output_paths_are_checked_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        kdlab_main(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_job_asked_for_cuda_on_a_machine_without_names_the_key(tmp_path, capsys):
    run = tiny_run(training={"device": "cuda:1"})
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 2
    assert "config key 'training.device': 'cuda:1', but this machine has 0 usable CUDA device(s)" in \
        capsys.readouterr().err


def test_teacher_weights_of_another_architecture_are_named_not_called_damaged(tmp_path, capsys):
    weights = tmp_path / "teacher" / "model.pth"
    weights.parent.mkdir()
    save_weights(weights, build_model("ResNet8", 3).state_dict())  # the tiny data have 5 classes
    run = tiny_run(kind="distill", method="kd", alpha=0.5, teacher="ResNet8", teacher_weights=str(weights))
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"teacher weights {weights} do not fit teacher ResNet8 with 5 classes: size mismatch for " in err
    assert "delete" not in err and weights.exists()


def test_teacher_not_larger_than_its_student_is_a_warning(tmp_path, capsys):
    config = demo()
    config["pairs"] = [{"teacher": "ResNet8", "student": "ResNet14"}, {"teacher": "ResNet14", "student": "ResNet8"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: config key 'pairs[0]': teacher ResNet8 is not larger than its student ResNet14" in err
    assert "pairs[1]" not in err


def test_a_cpu_device_with_gpus_requested_is_a_warning(tmp_path, capsys):
    config = demo()
    config["resources"]["gpu"] = 1
    for training, teacher_training, named in ((None, None, None), ("cpu", None, "training"),
                                              ("auto", "cpu", "teacher_training")):
        config["training"]["device"] = training or "auto"
        config["teacher_training"] = {"device": teacher_training} if teacher_training else {}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 0
        err = capsys.readouterr().err
        assert (f"warning: config key '{named}.device': 'cpu', while resources.gpu asks 1 GPU(s)" in err
                if named else "resources.gpu" not in err)


def test_checkpoint_minutes_not_under_the_walltime_is_a_warning(tmp_path, capsys):
    config = demo()
    config["resources"]["runtime"] = {"train_teacher": 90, "train_student": 60, "distill": 120}
    for training, teacher_training, named in ((59, None, None), (60, None, "training"), (5, 90, "teacher_training")):
        config["training"]["checkpoint_minutes"] = training
        config["teacher_training"] = {"checkpoint_minutes": teacher_training} if teacher_training else {}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 0
        err = capsys.readouterr().err
        assert (f"warning: config key '{named}.checkpoint_minutes': {training if named == 'training' else 90} is "
                f"not under the first attempt's walltime ({60 if named == 'training' else 90} min" in err
                if named else "checkpoint_minutes" not in err), err


def test_a_pair_listed_under_both_names_of_one_network_is_a_warning(tmp_path, capsys):
    config = demo()
    config["pairs"] = [{"teacher": "ResNet110", "student": "ResNet8"}, {"teacher": "ResNet112", "student": "ResNet8"},
                       {"teacher": "ResNet112", "student": "ResNet14"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: config key 'pairs[1]': ResNet112 -> ResNet8 is the same network pair as pairs[0]" in err
    assert "pairs[0]" not in err.replace("as pairs[0]", "") and "pairs[2]" not in err


def test_check_config_reads_the_data_files(tmp_path, capsys):
    x = np.zeros((8, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "keras.npz", x_train=x, y_train=np.arange(8) % 4, x_test=x[:4], y_test=np.arange(4))
    config = demo()
    config["data"] = {"dataset": "npz", "npz_path": str(tmp_path / "keras.npz")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 0, capsys.readouterr().err
    config["data"]["num_classes"] = 3  # label 3 is out of range
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 2
    assert "config key 'data.npz_path'" in capsys.readouterr().err
    config["data"] = {"dataset": "Cifar100", "data_dir": str(tmp_path / "nothing")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert kdlab_main(["check-config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config key 'data.data_dir'" in err and "cifar-100-python/train is missing" in err and "data.download: true" in err


def test_augmentation_is_part_of_what_a_run_computes():
    from kdlab.config import DEFAULT_AUGMENTATION, grid_schema, with_defaults
    run = resolve_run(tiny_run())
    assert run["data"]["augmentation"] == DEFAULT_AUGMENTATION
    schema = grid_schema()
    assert with_defaults({}, schema["$defs"]["data"], schema)["augmentation"] == DEFAULT_AUGMENTATION
    # The default is left out of a run's identity: runs made before the key existed stay valid.
    assert "augmentation" not in split_runtime(run)[0]["data"]
    no_flip = resolve_run(tiny_run(data={"augmentation": {"horizontal_flip": False}}))
    assert split_runtime(no_flip)[0]["data"]["augmentation"] == {"crop_padding": 4, "horizontal_flip": False}
    assert fingerprint(run, {}) != fingerprint(no_flip, {})
    assert resolve_run(split_runtime(no_flip)[0])["data"]["augmentation"]["horizontal_flip"] is False


# --- damaged files ------------------------------------------------------------------

RUN = tiny_run(data={"synthetic": {"num_classes": 5, "train_size": 96, "test_size": 48, "seed": 0}},
               training={"epochs": 3, "milestones": [2]})


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """(reference metrics, a run directory stopped after epoch 2's checkpoint)."""
    import kdlab.train
    reference = train(RUN, tmp_path_factory.mktemp("reference"))
    run_dir = tmp_path_factory.mktemp("interrupted")
    interrupt_after_checkpoints(kdlab.train, 2, train, RUN, run_dir)
    assert (run_dir / "checkpoint.prev.pth").exists()
    return reference, run_dir


def flip_bytes_inside_a_tensor(path, count=64):
    data = bytearray(path.read_bytes())
    # fc.weight: a linear layer's weight is stored in its logical order (a channels_last
    # convolution's storage is not), so its bytes can be found in the file.
    weight = torch.load(path, weights_only=True)["model"]["fc.weight"]
    start = bytes(data).find(weight.numpy().tobytes())
    assert start > 0
    start += 100
    for i in range(start, start + count):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def mismatching_checksum(path):
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["fc.bias"] += 1.0  # content changed, old checksum kept
    torch.save(ckpt, path)


def replaced_by_a_directory(path):
    path.unlink()
    path.mkdir()


DAMAGE = {
    "a directory": replaced_by_a_directory,
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]),
    # torch's zip reader raises OSError EINVAL, not a load error, for a file cut to 1-64 KiB
    "cut to 5000 bytes": lambda p: p.write_bytes(p.read_bytes()[:5000]),
    "garbage": lambda p: p.write_bytes(random.Random(0).randbytes(5000)),
    "bit rot in a tensor": flip_bytes_inside_a_tensor,
    "checksum mismatch": mismatching_checksum,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_moved_aside_and_the_previous_one_resumes(interrupted, tmp_path, damage, capsys):
    reference, source = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    DAMAGE[damage](run_dir / "checkpoint.pth")
    metrics = train(RUN, run_dir)
    out = capsys.readouterr().out
    assert "WARNING" in out and "moved it to" in out and "resuming from the previous checkpoint" in out
    assert (run_dir / "checkpoint.corrupt.pth").exists()
    assert metrics["resumed_at_epochs"] == [1]  # the previous checkpoint is epoch 1's
    assert comparable(metrics) == comparable(reference)
    assert verify_weights(run_dir / "model.pth")


def test_a_damaged_checkpoint_never_replaces_one_moved_aside_before(interrupted, tmp_path, capsys):
    _, source = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    (run_dir / "checkpoint.corrupt.pth").mkdir()  # an earlier incident's, of another kind
    (run_dir / "checkpoint.pth").write_bytes(b"")
    train(RUN, run_dir)
    assert (run_dir / "checkpoint.corrupt.pth").is_dir() and (run_dir / "checkpoint.corrupt2.pth").read_bytes() == b""
    assert "moved it to" in capsys.readouterr().out


def test_both_checkpoints_damaged_starts_fresh(interrupted, tmp_path, capsys):
    reference, source = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    (run_dir / "checkpoint.pth").write_bytes(b"")
    flip_bytes_inside_a_tensor(run_dir / "checkpoint.prev.pth")
    metrics = train(RUN, run_dir)
    assert "no usable checkpoint left: starting fresh" in capsys.readouterr().out
    assert metrics["resumed_at_epochs"] == [] and comparable(metrics) == comparable(reference)


def test_a_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*progress.json'"):
        atomic_write_json(tmp_path / "progress.json", {})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("error,cause", [
    (OSError(28, "No space left on device", "CHECKPOINT"), "[Errno 28] No space left on device: 'CHECKPOINT'"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB.\nSee the documentation."),
     "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB.")], ids=["full-disk", "crash"])
def test_a_run_stopped_by_an_error_says_why_in_progress_json_and_running_it_again_resumes(
        error, cause, tmp_path, monkeypatch, capsys):
    """A checkpoint that cannot be written (disk full, quota exceeded, a Lustre I/O error), CUDA out of memory
    or a bug stops the job; progress.json, which said "running" for good, says why, for kdlab results' health
    list (the job's log, which the retry's log replaces, is not the only place)."""
    import kdlab.train
    run_dir, real_save, saves = tmp_path / "run", kdlab.train.save_checkpoint, []
    if isinstance(error, OSError):
        error.filename = str(run_dir / "checkpoint.pth")
    cause = cause.replace("CHECKPOINT", str(run_dir / "checkpoint.pth"))

    def fails_on_the_second(path, obj):
        saves.append(path)
        if len(saves) == 2:
            raise error
        real_save(path, obj)
    monkeypatch.setattr(kdlab.train, "save_checkpoint", fails_on_the_second)
    args = ["train", "--config", json.dumps(RUN), "--run-dir", str(run_dir)]
    if isinstance(error, OSError):  # one line naming the file, exit 1
        assert kdlab_main(args) == 1
        assert capsys.readouterr().err == f"kdlab train: error: {cause}\n"
    else:  # a traceback in the job's log
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            kdlab_main(args)
    progress = read_json(run_dir / "progress.json")
    assert (progress["status"], progress["error"]) == (
        "interrupted", f"interrupted by {cause}; running it again resumes from its checkpoint at epoch 1")
    monkeypatch.setattr(kdlab.train, "save_checkpoint", real_save)
    assert kdlab_main(args) == 0
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["resumed_at_epochs"] == [1] and metrics["provenance"]["resumes"][0]["after"] == progress["error"]
    assert f"the process before: {progress['error']}" in capsys.readouterr().out


def test_a_resume_that_fails_before_it_trains_replaces_the_cause_before_it(interrupted, tmp_path, monkeypatch):
    """A Ctrl-C, then a resume that stops before it writes "running" (a teacher it cannot load, a
    checkpoint it cannot restore): progress.json and the next resume name the second cause, not the first."""
    import kdlab.train
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted[1], run_dir)
    kdlab.train.mark_interrupted(run_dir, "Ctrl-C")  # as kdlab train does on Ctrl-C
    args = ["train", "--config", json.dumps(RUN), "--run-dir", str(run_dir)]
    real_restore = kdlab.train.restore

    def cannot_restore(*a):
        raise RuntimeError("Error(s) in loading state_dict")
    monkeypatch.setattr(kdlab.train, "restore", cannot_restore)
    with pytest.raises(RuntimeError):
        kdlab_main(args)
    progress = read_json(run_dir / "progress.json")
    assert progress["status"] == "interrupted" and progress["error"].startswith(
        "interrupted by RuntimeError: Error(s) in loading state_dict; running it again resumes")
    monkeypatch.setattr(kdlab.train, "restore", real_restore)
    assert kdlab_main(args) == 0
    assert read_json(run_dir / "metrics.json")["provenance"]["resumes"][0]["after"] == progress["error"]


def posix_acl(*entries):
    """A minimal POSIX ACL as Linux stores it in system.posix_acl_*: (tag, permission bits) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)


@pytest.mark.parametrize("default_acl", [False, True], ids=["umask", "default-acl"])
def test_files_get_the_mode_a_plain_open_gives_them(tmp_path, default_acl):
    """A group's shared directory with a default ACL (d:g::rwx) gives new files group access whatever the
    umask; atomic writes (mkstemp's 0600, then chmod to 0666 & ~umask) made them 0600 there under
    umask 077, so the group could not read the teachers and metrics it shares."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if default_acl:
        try:
            os.setxattr(shared, "system.posix_acl_default", posix_acl((0x01, 7), (0x04, 7), (0x20, 0)))
        except (AttributeError, OSError) as e:
            pytest.skip(f"no POSIX ACLs here ({e})")
    umask = os.umask(0o077 if default_acl else 0o027)
    try:
        (shared / "plain.json").write_text("{}")
        atomic_write_json(shared / "metrics.json", {})
        save_weights(shared / "model.pth", {"w": torch.zeros(1)})
    finally:
        os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in shared.iterdir()}
    assert modes == dict.fromkeys(["plain.json", "metrics.json", "model.pth", "model.pth.sha256"],
                                  "0o660" if default_acl else "0o640")


def test_compile_warns_when_its_cache_directory_is_short_of_space(tmp_path, monkeypatch, capsys):
    """torch.compile fills TORCHINDUCTOR_CACHE_DIR (default: $TMPDIR or /tmp, often small on a compute
    node) with a 150 MB precompiled header on the CPU; full, the first step fails with "cannot write
    PCH file" and nothing says the disk is full. (The compile itself is left out: torch.compile is the
    identity here.)"""
    pytest.importorskip("torch._inductor.runtime.cache_dir_utils")  # torch's own rule; elsewhere no check
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch, "compile", lambda model: model)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=40 << 20))
    train(tiny_run(data=RUN["data"], training={"epochs": 1, "milestones": [1], "compile": True}), tmp_path / "run")
    assert (f"WARNING: torch.compile's cache directory {tmp_path / 'inductor'} has 40 MB free, and compiling needs "
            f"up to 512 MB" in capsys.readouterr().out)
    (tmp_path / "inductor").rmdir()
    (tmp_path / "inductor").write_text("")  # not a directory: cannot be created
    train(tiny_run(data=RUN["data"], training={"epochs": 1, "milestones": [1], "compile": True}), tmp_path / "run2")
    assert "WARNING: torch.compile's cache directory cannot be used" in capsys.readouterr().out


def test_a_kill_between_linking_and_saving_leaves_no_temporary_link(interrupted, tmp_path):
    """A kill after checkpoint.prev.pth became a link of checkpoint.pth, before the new one
    replaced it: the next save must not leave its temporary link behind (rename() between
    two links of one file does nothing) and must keep two distinct checkpoints."""
    _, source = interrupted
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    (run_dir / "checkpoint.prev.pth").unlink()
    os.link(run_dir / "checkpoint.pth", run_dir / "checkpoint.prev.pth")
    before = load_checked(run_dir / "checkpoint.pth")["epoch"]
    save_checkpoint(run_dir / "checkpoint.pth", {"epoch": before + 1})
    assert not list(run_dir.glob(".*.tmp"))
    assert load_checked(run_dir / "checkpoint.prev.pth")["epoch"] == before
    assert load_checked(run_dir / "checkpoint.pth")["epoch"] == before + 1


def test_checkpoints_carry_a_checksum_of_their_content(interrupted, tmp_path):
    _, source = interrupted
    ckpt = torch.load(source / "checkpoint.pth", weights_only=True)
    saved = ckpt.pop("sha256")
    assert saved == content_sha256(ckpt)
    shutil.copy(source / "checkpoint.pth", tmp_path / "c.pth")
    flip_bytes_inside_a_tensor(tmp_path / "c.pth", count=4)
    with pytest.raises(UnreadableFile, match="does not match its checksum"):
        load_checked(tmp_path / "c.pth")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher")
    train(tiny_run(training={"epochs": 1}), run_dir)
    return run_dir


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit rot", "sidecar not text"])
def test_damaged_teacher_weights_name_the_file_and_the_rule(teacher_dir, tmp_path, damage, capsys):
    weights = tmp_path / "model.pth"
    shutil.copy(teacher_dir / "model.pth", weights)
    shutil.copy(teacher_dir / "model.pth.sha256", tmp_path)
    # model.pth is still a plain state_dict for users
    assert set(torch.load(weights, weights_only=True)) == set(torch.load(teacher_dir / "checkpoint.pth",
                                                                         weights_only=True)["model"])
    data = weights.read_bytes()
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(data[:1000])
    elif damage == "sidecar not text":
        (tmp_path / "model.pth.sha256").write_bytes(b"\xcd\xff\n")
    else:
        middle = len(data) // 2
        weights.write_bytes(data[:middle] + bytes(b ^ 1 for b in data[middle:middle + 64]) + data[middle + 64:])
    run = tiny_run(kind="distill", method="kd", alpha=0.5, teacher="ResNet8", teacher_weights=str(weights))
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"teacher weights {weights}" in err and "rule train_teacher" in err and "Traceback" not in err


def test_missing_teacher_weights_say_so_and_leave_no_run_directory(tmp_path, capsys):
    weights = tmp_path / "teachers" / "model.pth"
    run = tiny_run(kind="distill", method="kd", alpha=0.5, teacher="ResNet8", teacher_weights=str(weights))
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"teacher weights {weights} do not exist: they are the output of rule train_teacher" in err
    assert "delete" not in err and not (tmp_path / "run").exists()


def test_a_read_file_made_a_directory_says_what_to_do(tmp_path, capsys):
    """The damage campaign's teacher weights, cache or paraphraser made a directory: the OSError named it, no remedy."""
    weights = tmp_path / "teachers" / "model.pth"
    weights.mkdir(parents=True)
    run = tiny_run(kind="distill", method="kd", alpha=0.5, teacher="ResNet8", teacher_weights=str(weights))
    assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"Is a directory: '{weights}'; a file is expected there: if kdlab wrote it, remove the directory" in err


def test_verify_names_damaged_final_weights_and_its_mend_restores_them(tmp_path, capsys):
    """Nothing reads a complete student's model.pth again (a random-damage campaign flipped, cut and
    replaced them unseen): `kdlab verify` checks every one against its checksum file, and what it says
    to do (delete it, rerun: the finished checkpoint writes it anew) gives back the same bytes."""
    exp = tmp_path / "experiments"
    run_dir, other = exp / "Synthetic/none/ResNet8/0", exp / "Synthetic/none/ResNet8/1"
    with contextlib.redirect_stdout(io.StringIO()):
        train(tiny_run(), run_dir)
    weights, intact = run_dir / "model.pth", (run_dir / "model.pth").read_bytes()
    other.mkdir(parents=True)
    (other / "model.pth").mkdir()  # damaged into a directory
    (exp / "old").mkdir()
    (exp / "old/model.pth").write_bytes(b"weights of a kdlab without checksum files")
    for run in (other, exp / "old"):
        shutil.copy(run_dir / "metrics.json", run)  # runs, as kdlab results finds them
    (exp / "not-a-run").mkdir()
    (exp / "not-a-run/model.pth").write_bytes(b"")
    assert kdlab_main(["verify", str(exp)]) == 1
    assert capsys.readouterr().out.startswith(f"kdlab verify: 3 weights file(s) of the runs under {exp}: 1 damaged, "
                                              f"1 without")
    shutil.rmtree(other)
    (run_dir / "model.pth.sha256").rename(run_dir / "elsewhere")
    (run_dir / "model.pth.sha256").symlink_to(run_dir / "elsewhere")
    assert kdlab_main(["verify", str(exp)]) == 0
    capsys.readouterr()
    (run_dir / "elsewhere").unlink()  # its checksum file now a link to nothing: damaged, not unchecked
    assert kdlab_main(["verify", str(exp)]) == 1
    sidecar = run_dir / "model.pth.sha256"
    assert f"  damaged: [Errno 2] No such file or directory: '{sidecar}'" in capsys.readouterr().out
    weights.unlink()  # what it says to do; then the job that Snakemake reruns for the missing output:
    with contextlib.redirect_stdout(io.StringIO()):
        train(tiny_run(), run_dir)
    assert weights.read_bytes() == intact and kdlab_main(["verify", str(exp)]) == 0
    capsys.readouterr()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x01
    weights.write_bytes(bytes(damaged))
    assert kdlab_main(["verify", str(exp)]) == 1
    out = capsys.readouterr().out
    assert f"  damaged: {weights} or its checksum file model.pth.sha256 is corrupt" in out
    assert "To mend: delete each damaged model.pth and run snakemake again" in out
    weights.unlink()  # then the job that Snakemake reruns for the missing output:
    with contextlib.redirect_stdout(io.StringIO()):
        train(tiny_run(), run_dir)
    assert weights.read_bytes() == intact
    assert kdlab_main(["verify", str(exp)]) == 0
    assert ": 0 damaged, 1 without a checksum file" in capsys.readouterr().out


def test_damaged_paraphraser_names_the_file_and_the_rule(tmp_path, capsys):
    from kdlab.methods.ft import PARAPHRASER_KEYS, load_paraphraser
    from kdlab.runio import save_checked
    settings = {"rate": 0.5, "paraphraser_loss": "l1", "paraphraser_epochs": 1, "paraphraser_lr": 0.1}
    path = tmp_path / "paraphraser.pth"
    save_checked(path, {"state_dict": {"w": torch.ones(3)}, "settings": {k: settings[k] for k in PARAPHRASER_KEYS}})
    data = path.read_bytes()
    start = data.find(torch.ones(3).numpy().tobytes())
    path.write_bytes(data[:start] + b"\x00" * 4 + data[start + 4:])
    with pytest.raises(UnreadableFile, match=r"paraphraser\.pth.*checksum.*rule pretrain_paraphraser"):
        load_paraphraser(str(path), settings)
    path.write_bytes(b"")
    with pytest.raises(UnreadableFile, match=r"truncated or corrupt.*rule pretrain_paraphraser"):
        load_paraphraser(str(path), settings)


def test_a_paraphraser_of_other_settings_or_another_teacher_is_refused(tmp_path):
    from kdlab.methods.ft import PARAPHRASER_KEYS, ParaphraserError, load_paraphraser
    from kdlab.runio import save_checked
    settings = {"rate": 0.5, "paraphraser_loss": "l1", "paraphraser_epochs": 1, "paraphraser_lr": 0.1}
    path = tmp_path / "paraphraser.pth"
    save_checked(path, {"state_dict": {}, "settings": {k: settings[k] for k in PARAPHRASER_KEYS},
                        "teacher_weights_sha256": "a" * 64})
    with pytest.raises(ParaphraserError, match=r"trained with paraphraser_epochs=1, but this run asks for 3: delete "
                                               r".*rule pretrain_paraphraser"):
        load_paraphraser(str(path), {**settings, "paraphraser_epochs": 3})
    with pytest.raises(ParaphraserError, match=r"pre-trained on another teacher's features .*aaaaaaaaaaaa.*"
                                               r"bbbbbbbbbbbb.*rule pretrain_paraphraser"):
        load_paraphraser(str(path), settings, teacher_sha256="b" * 64)


# --- non-finite weights are never saved ----------------------------------------------

@pytest.mark.parametrize("what", ["parameter", "buffer", "test loss"])
def test_nonfinite_weights_or_test_loss_stop_the_run_before_anything_is_saved(what, tmp_path, monkeypatch):
    import kdlab.train
    real_sgd, real_evaluate, steps = torch.optim.SGD, kdlab.train.evaluate, []

    class PoisoningSGD(real_sgd):
        def step(self, closure=None):  # epoch 2's last step makes a weight non-finite, the loss stays finite
            out = super().step(closure)
            steps.append(1)
            if len(steps) == 6 and what != "test loss":
                model = self.model
                target = model.fc.weight if what == "parameter" else model.stem[1].running_var
                target.data[0] = float("inf")
            return out

    def evaluate(model, *args):
        loss, acc = real_evaluate(model, *args)
        return (float("nan"), acc) if what == "test loss" and len(steps) == 6 else (loss, acc)

    real_build = kdlab.train.build_model

    def build(name, classes):
        model = real_build(name, classes)
        PoisoningSGD.model = model
        return model
    monkeypatch.setattr(kdlab.train.torch.optim, "SGD", PoisoningSGD)
    monkeypatch.setattr(kdlab.train, "evaluate", evaluate)
    monkeypatch.setattr(kdlab.train, "build_model", build)
    run = tiny_run(data={"synthetic": {"num_classes": 5, "train_size": 96, "test_size": 48, "seed": 0}},
                   training={"epochs": 2, "milestones": [1]})  # 3 steps per epoch: epoch 2 is the last
    # Each case must be caught by its own check: an inf weight also makes the test loss NaN.
    expected = {"parameter": r"weight tensor\(s\) went non-finite in the optimizer step \(fc\.weight",
                "buffer": r"1 buffer\(s\) went non-finite \(stem\.1\.running_var\) while every weight is finite",
                "test loss": r"the test loss is nan"}[what]
    with pytest.raises(GuardError, match=expected):
        train(run, tmp_path)
    progress = strict_json(tmp_path / "progress.json")
    assert progress["status"] == "failed" and "health guard" in progress["error"]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.pth").exists()
    ckpt = load_checked(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    if what == "test loss":
        assert progress["history"]["test_loss"][-1] is None  # strict JSON: null, not NaN


def test_json_files_are_strict(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1.0, float("nan"), float("inf")], "b": {"c": -math.inf}})
    written = strict_json(tmp_path / "x.json")
    assert written.pop("sha256") == json_sha256(written)  # the checksum kdlab results checks
    assert written == {"a": [1.0, None, None], "b": {"c": None}}


# --- kill and resume ----------------------------------------------------------------

KILL_RUN = tiny_run(data={"synthetic": {"num_classes": 4, "train_size": 64, "test_size": 32, "seed": 1}},
                    training={"epochs": 5, "milestones": [3]})


def train_and_die(run_dir, how, value):
    """In a forked child (no second import of torch): train, dying by SIGKILL after `value`
    seconds of training, or inside the `value`-th checkpoint write: after the current one
    is linked as the previous one, halfway through the temporary file, or before the rename."""
    import threading
    import kdlab.runio as runio
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    writes, real_write, real_link = [], runio.atomic_write, os.link

    def write(path, writer):
        if str(path).endswith("checkpoint.pth"):
            writes.append(path)
            if len(writes) == value and how == "mid-write":
                data = io.BytesIO()
                writer(data)
                (run_dir / ".checkpoint.pth.half.tmp").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
                die()
            if len(writes) == value and how == "before-rename":
                die()
        return real_write(path, writer)

    def link(src, dst):
        real_link(src, dst)
        if str(src).endswith("checkpoint.pth") and len(writes) + 1 == value and how == "after-link":
            die()
    runio.atomic_write, os.link = write, link
    if how == "seconds":
        threading.Timer(value, die).start()
    with open(os.devnull, "w") as quiet:
        sys.stdout = quiet
        train(KILL_RUN, run_dir)


def test_sigkilled_at_random_instants_resumes_to_bit_identical_weights(tmp_path):
    import multiprocessing
    reference = train(KILL_RUN, tmp_path / "reference")
    run_dir = tmp_path / "killed"
    rng = random.Random(10)
    # Each process resumes from what the previous one left: a kill inside the 2nd
    # checkpoint write of each process, then kills at random instants.
    kills = [("after-link", 2), ("mid-write", 2), ("before-rename", 2)] + [
        ("seconds", round(rng.uniform(0.05, 1.5), 2)) for _ in range(3)]
    survived = 0
    for how, value in kills:
        child = multiprocessing.get_context("fork").Process(target=train_and_die, args=(run_dir, how, value))
        child.start()
        child.join(300)
        if child.exitcode != -signal.SIGKILL:
            assert child.exitcode == 0
            break
        survived += 1
    assert survived >= 4, f"only {survived} kills landed"
    metrics = train(KILL_RUN, run_dir) if not (run_dir / "metrics.json").exists() else read_json(
        run_dir / "metrics.json")
    assert comparable(metrics) == comparable(reference)
    weights, expected = (torch.load(d / "model.pth", weights_only=True) for d in (run_dir, tmp_path / "reference"))
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    assert verify_weights(run_dir / "model.pth") == verify_weights(tmp_path / "reference" / "model.pth")
    assert not list(run_dir.glob(".*.tmp"))
    strict_json(run_dir / "metrics.json")


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_marks_the_run_interrupted_and_running_it_again_resumes(tmp_path, workers):
    """A PBS walltime or memory kill, qdel, and Snakemake stopping its jobs send SIGTERM, to
    every process of the job (loader workers too) and often twice: the job ends with one line
    and exit 143, its progress.json says interrupted (it would say running for ever), the
    health list shows it so, and running it again resumes."""
    import multiprocessing
    import kdlab.train
    from kdlab.results.health import build_health
    from kdlab.results.runs import load_runs
    run = tiny_run(data={"synthetic": {"num_classes": 4, "train_size": 64, "test_size": 32, "seed": 1}},
                   training={"epochs": 4, "milestones": [3], "num_workers": workers})
    experiments = tmp_path / "experiments"
    run_dir = experiments / "Synthetic" / "teachers" / "ResNet8" / "0"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        reference = train(run, tmp_path / "reference")

    def sigterm_after_the_second_epoch():  # in a forked child: the signal's own path, not a raise
        real_write, real_mark, progress_writes = kdlab.train.atomic_write_json, kdlab.train.mark_interrupted, []

        def write(path, obj):
            real_write(path, obj)
            if path.name == "progress.json":
                progress_writes.append(path)
                if len(progress_writes) == 2:  # to the job and its loader workers, from outside, as PBS's MoM
                    kill = f"import os; os.killpg({os.getpgid(0)}, {int(signal.SIGTERM)})"
                    subprocess.run([sys.executable, "-c", kill])

        def mark_interrupted(*args):
            os.kill(os.getpid(), signal.SIGTERM)  # the second one (Snakemake's, or PBS's), while it marks
            real_mark(*args)
        os.setpgid(0, 0)  # a process group of its own: the job and its loader workers
        kdlab.train.atomic_write_json, kdlab.train.mark_interrupted = write, mark_interrupted
        sys.stdout, sys.stderr = open(os.devnull, "w"), open(tmp_path / "stderr", "w")
        code = kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(run_dir)])
        sys.stderr.flush()
        os._exit(code)
    child = multiprocessing.get_context("fork").Process(target=sigterm_after_the_second_epoch)
    child.start()
    child.join(120)
    assert child.exitcode == 143
    assert (tmp_path / "stderr").read_text() == ("kdlab train: stopped by SIGTERM; what it saved is kept, and "
                                                 "running it again resumes from there\n")
    progress = read_json(run_dir / "progress.json")
    assert progress["status"] == "interrupted" and progress["epochs_done"] == 2
    assert progress["error"].startswith("interrupted by SIGTERM (walltime or memory kill")
    health = build_health(load_runs(str(experiments))[0])
    assert [(e["status"], e["epochs_done"], e["error"]) for e in health["incomplete"]] == [
        ("interrupted", 2, progress["error"])]
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        metrics = train(run, run_dir)
    assert metrics["resumed_at_epochs"] == [2] and comparable(metrics) == comparable(reference)
    assert metrics["provenance"]["resumes"][0]["after"] == progress["error"]  # the retry's log replaced the first's
    assert read_json(run_dir / "progress.json")["status"] == "complete"


def test_ctrl_c_at_the_finished_checkpoint_is_recorded_as_ctrl_c_not_as_a_sigkill(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) after the run wrote metrics.json, while it writes its finished checkpoint (hit
    by random kills of the whole workflow): the job is stopped there, resumes from the checkpoint before,
    and its resume must say Ctrl-C, not 'killed without a chance to say why (SIGKILL...)', which it said
    while progress.json was marked complete before that checkpoint."""
    import kdlab.train
    run, run_dir = tiny_run(), tmp_path / "run"
    real_save = kdlab.train.save_checkpoint

    def ctrl_c_at_the_finished_checkpoint(path, obj):
        if obj["finished"]:
            raise KeyboardInterrupt
        real_save(path, obj)
    monkeypatch.setattr(kdlab.train, "save_checkpoint", ctrl_c_at_the_finished_checkpoint)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert kdlab_main(["train", "--config", json.dumps(run), "--run-dir", str(run_dir)]) == 130
    progress = read_json(run_dir / "progress.json")
    assert (progress["status"], progress["epochs_done"]) == ("interrupted", 2)
    assert progress["error"].startswith("interrupted by Ctrl-C")
    monkeypatch.setattr(kdlab.train, "save_checkpoint", real_save)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(run, run_dir)
    assert metrics["resumed_at_epochs"] == [2]
    assert metrics["provenance"]["resumes"][0]["after"] == progress["error"]
    assert read_json(run_dir / "progress.json")["status"] == "complete"


def test_ctrl_c_in_a_job_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """Ctrl-C in the terminal reaches every running job; Snakemake then shows each job's log."""
    import kdlab.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(kdlab.train, "train", interrupted)
    assert kdlab_main(["train", "--config", "{}", "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ("kdlab train: interrupted; what it saved is kept, and running it again "
                                       "resumes from there\n")


def test_marking_a_damaged_progress_file_interrupted_does_not_give_it_a_valid_checksum(tmp_path):
    """mark_interrupted rewrites progress.json with a fresh checksum: read damaged, it would pass kdlab results."""
    from kdlab.train import mark_interrupted
    atomic_write_json(tmp_path / "progress.json", {"status": "running", "epochs_done": 2, "best_acc": 10.83})
    damaged = (tmp_path / "progress.json").read_text().replace("10.83", "90.83")
    (tmp_path / "progress.json").write_text(damaged)
    mark_interrupted(tmp_path, "Ctrl-C")
    assert (tmp_path / "progress.json").read_text() == damaged


def test_ctrl_c_while_a_job_starts_is_one_line_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C in a job's first second (while torch imports, before the command's own handling; hit by
    killcamp's random kills of the workflow): one line and exit 130, not a traceback in the job's log."""
    import kdlab.cli

    def ctrl_c_while_importing():
        raise KeyboardInterrupt
    monkeypatch.setattr(kdlab.cli, "build_parser", ctrl_c_while_importing)
    assert kdlab_main(["train", "--config", "{}", "--run-dir", "x"]) == 130
    assert capsys.readouterr().err == "kdlab: interrupted while starting, before it wrote anything\n"


def test_ctrl_c_while_python_m_kdlab_imports_its_cli_is_one_line_not_a_traceback():
    """The same while `python -m kdlab` imports kdlab.cli, before main() runs (hit by the random kills)."""
    hook = ("import runpy, sys\n"
            "class CtrlC:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'kdlab.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, CtrlC())\n"
            "sys.argv = ['kdlab', 'train']\n"
            "runpy.run_module('kdlab', run_name='__main__', alter_sys=True)\n")
    done = subprocess.run([sys.executable, "-c", hook], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert (done.returncode, done.stderr) == (130, "kdlab: interrupted while starting, before it wrote anything\n")


# --- two processes on one run ---------------------------------------------------------------

def hold_lock_elsewhere(target, tmp_path, forked_child=False):
    """Another process (in a session of its own) that holds target's lock (runio.exclusive) until it is
    killed; with forked_child, it forks a child (as a DataLoader does) once it holds it."""
    ready = tmp_path / "holds"
    fork = "    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n" if forked_child else ""
    holder = subprocess.Popen([sys.executable, "-c", "import os, pathlib, sys, time\n"
                               "from kdlab.runio import exclusive\n"
                               f"with exclusive(sys.argv[1]):\n{fork}    pathlib.Path(sys.argv[2]).touch()\n"
                               "    time.sleep(600)", str(target), str(ready)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    for _ in range(600):
        if ready.exists() or holder.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), "the holder did not take the lock"
    return holder


def test_a_second_job_on_a_run_in_use_stops_and_touches_nothing_and_a_killed_holder_leaves_no_lock(tmp_path,
                                                                                                    capsys):
    """Two workflows sharing an experiments_dir (or a job an earlier workflow left running) would train one
    run in one directory at once: the second removed the first's temporary files and both wrote its files."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    theirs = {".checkpoint.pth.0a1b2c3d.tmp": "being written", "progress.json": '{"status": "running"}'}
    for name, text in theirs.items():
        (run_dir / name).write_text(text)
    holder = hold_lock_elsewhere(run_dir, tmp_path)
    command = ["train", "--config", json.dumps(RUN), "--run-dir", str(run_dir)]
    try:
        assert kdlab_main(command) == 1
        error = capsys.readouterr().err
        assert f"{run_dir} is in use by another process (host " in error and f" pid {holder.pid} " in error
        assert {p.name: p.read_text() for p in run_dir.iterdir()} == theirs
    finally:
        holder.kill()  # SIGKILL: it releases nothing itself
        holder.wait()
    assert kdlab_main(command) == 0
    assert read_json(run_dir / "metrics.json")["status"] == "complete"


@pytest.mark.parametrize("command,option,locked", [
    ("train", "--run-dir", "run"), ("import-teacher", "--run-dir", "run"),
    ("pretrain-paraphraser", "--out", "run/paraphraser_x/paraphraser.pth"),
    ("cache-teacher", "--out", "run/teacher_cache.pth")])  # the teacher's run directory, which training cleans
def test_every_command_that_writes_takes_its_lock_first(command, option, locked, tmp_path, capsys):
    target = tmp_path / (locked if option == "--out" else "run")
    held = tmp_path / "run" if command == "cache-teacher" else target
    weights = ["--weights", str(tmp_path / "run/model.pth")] if command == "cache-teacher" else []
    with exclusive(held):
        assert kdlab_main([command, "--config", "{}", option, str(target), *weights]) == 1
    assert f"kdlab {command}: error: {held} is in use by another process (host " in capsys.readouterr().err
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [
        held.relative_to(tmp_path).with_name(f".{held.name}.lock")]


def test_without_flock_the_work_goes_on_with_a_warning(tmp_path, monkeypatch, capsys):
    """Lustre mounted noflock answers flock() with ENOSYS."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(kdlab.runio.fcntl, "flock", no_flock)
    with exclusive(tmp_path / "run"):
        pass
    assert f"cannot lock {tmp_path / '.run.lock'} (Function not implemented); working without" in \
        capsys.readouterr().err


def test_a_lock_that_cannot_be_made_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    """A run directory in a directory this user may only read (another user's, a read-only mount): the run
    itself may still be work that needs no write there (a finished run's outputs); only the lock is given up."""
    real_open = os.open

    def refused(path, flags, *mode):
        if str(path).endswith(".run.lock") and flags & os.O_CREAT:  # as the kernel answers a non-root user
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *mode)
    monkeypatch.setattr(os, "open", refused)
    with exclusive(tmp_path / "run"):
        pass
    assert f"cannot lock {tmp_path / '.run.lock'} (Permission denied); working without" in capsys.readouterr().err


def test_the_lock_ends_with_its_holder_not_with_the_children_it_forked(tmp_path):
    """DataLoader workers are forked, and a fork shares the parent's flock: a SIGKILLed job's workers (the OOM
    killer takes the trainer) held its run for 5 s more, or as long as a hung file system kept them, and the
    next job was refused in the name of a dead process."""
    holder = hold_lock_elsewhere(tmp_path / "run", tmp_path, forked_child=True)
    try:
        holder.kill()
        holder.wait()
        with exclusive(tmp_path / "run"):  # its child still runs
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_a_run_reached_through_a_symlink_has_the_lock_of_the_run_itself(tmp_path):
    """Two paths to one run directory, one of them a symlink to it, took two locks and both wrote the run."""
    (tmp_path / "runs" / "0").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "0")
    with exclusive(tmp_path / "runs" / "0"):
        with pytest.raises(kdlab.runio.Busy, match="is in use by another process"):
            with exclusive(tmp_path / "link"):
                pass


def test_another_users_lock_file_on_nfs_warns_and_works_unlocked(tmp_path, monkeypatch, capsys):
    """A lock file this user cannot write is opened read-only, which local flock() accepts; NFS emulates flock()
    with byte-range locks, whose exclusive lock needs a file open for writing (flock(2)): EBADF, and every job on
    that run failed with '[Errno 9] Bad file descriptor'."""
    lock = tmp_path / ".run.lock"
    lock.write_text("host n1 pid 4711 since 2026-01-01\n")
    real_open, real_flock = os.open, kdlab.runio.fcntl.flock
    def open_as_another_user(path, flags, *mode):
        if str(path) == str(lock) and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *mode)
    def nfs_flock(fd, operation):
        if access_mode(fd) == os.O_RDONLY and operation & kdlab.runio.fcntl.LOCK_EX:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, operation)
    monkeypatch.setattr(kdlab.runio.os, "open", open_as_another_user)
    monkeypatch.setattr(kdlab.runio.fcntl, "flock", nfs_flock)
    with exclusive(tmp_path / "run"):
        pass
    assert f"cannot lock {lock} (this user may not write it, and this file system (NFS) locks only files open " \
           f"for writing); working without" in capsys.readouterr().err


def access_mode(fd):
    return kdlab.runio.fcntl.fcntl(fd, kdlab.runio.fcntl.F_GETFL) & os.O_ACCMODE


def test_another_users_lock_file_still_locks_where_it_cannot_be_written(tmp_path, monkeypatch):
    """flock() needs no write (but on NFS): a lock file this user may only read still keeps it off a run in use;
    it cannot write its own line there, so the refusal says the holder it names is the last that could."""
    lock, real_open = tmp_path / ".run.lock", os.open

    def read_only(path, flags, *mode):
        if str(path) == str(lock) and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *mode)
    with exclusive(tmp_path / "run"):
        monkeypatch.setattr(os, "open", read_only)
        with pytest.raises(kdlab.runio.Busy, match=r"in use by another process \(as last written by one that could "
                                                   rf"write the lock file: host \S+ pid {os.getpid()} "):
            with exclusive(tmp_path / "run"):
                pass
