"""The training loop: learning, determinism, checkpoints, resume after SIGKILL, the guard."""

import itertools
import json
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import kdlab.train
from kdlab.data import load_dataset
from kdlab.runio import code_sha256, torch_load, verify_weights
from kdlab.guard import GuardError
from kdlab.train import train

from conftest import REPO, comparable, interrupt_after_checkpoints, read_json, tiny_run

CHANCE = 100 / 5


def test_teacher_learns_and_same_seed_gives_identical_metrics(trained_teacher, tmp_path):
    run_dir, metrics = trained_teacher
    assert metrics["best_acc"] > CHANCE + 50, metrics["history"]["test_acc"]
    assert metrics["history"]["train_loss"][-1] < metrics["history"]["train_loss"][0]
    again = train(tiny_run(training={"epochs": 4, "milestones": [3]}), tmp_path)
    assert comparable(again) == comparable(read_json(run_dir / "metrics.json"))
    other_seed = train(tiny_run(seed=1, training={"epochs": 1}), tmp_path / "seed1")
    assert other_seed["history"]["train_loss"][0] != again["history"]["train_loss"][0]


def test_run_directory_contract(trained_teacher):
    run_dir, metrics = trained_teacher
    saved = read_json(run_dir / "metrics.json")
    assert saved["status"] == "complete" and read_json(run_dir / "progress.json")["status"] == "complete"
    h = saved["history"]
    assert {len(v) for k, v in h.items() if k != "terms"} == {4} and list(h["terms"]) == ["ce"]
    assert h["lr"] == pytest.approx([0.05, 0.05, 0.05, 0.005])
    assert saved["best_acc"] == max(h["test_acc"]) and saved["last_acc"] == h["test_acc"][-1]
    assert h["test_acc"][saved["best_epoch"] - 1] == saved["best_acc"]
    prov = saved["provenance"]
    assert prov["torch_version"] == torch.__version__ and prov["device"] == "cpu" and prov["finished"]
    assert len(prov["git_commit"] or "") == 40 and isinstance(prov["git_dirty"], bool)
    assert prov["code_sha256"] == code_sha256() and prov["data_sha256"] == load_dataset(saved["config"]["data"]).sha256()
    assert saved["config"]["training"]["label_smoothing"] == 0.1
    # Checkpoint and final weights load with weights_only=True.
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == 4 and "scaler" in ckpt and "optimizer" in ckpt
    weights = torch.load(run_dir / "model.pth", weights_only=True)
    assert set(weights) == set(ckpt["model"])


def test_truncated_checkpoint_is_reported_and_moved_aside(tmp_path, capsys):
    run = tiny_run(training={"epochs": 2})
    train(run, tmp_path)
    data = (tmp_path / "checkpoint.pth").read_bytes()
    (tmp_path / "checkpoint.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="truncated or corrupt"):
        torch_load(tmp_path / "checkpoint.pth")
    metrics = train(run, tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint.pth is truncated or corrupt" in out and "starting fresh" in out
    assert (tmp_path / "checkpoint.corrupt.pth").exists() and metrics["status"] == "complete"


def test_a_finished_checkpoint_writes_the_outputs_unless_code_or_data_changed(tmp_path, capsys, monkeypatch):
    """Snakemake reruns a finished job whose completion it never recorded (it was killed
    itself), or whose outputs were deleted: the finished checkpoint holds the run."""
    run = tiny_run(training={"epochs": 2})
    first = train(run, tmp_path)
    weights = (tmp_path / "model.pth").read_bytes()
    for output in ("metrics.json", "model.pth", "model.pth.sha256"):
        (tmp_path / output).unlink()
    capsys.readouterr()
    again = train(run, tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint holds this run, finished by the same code: writing its outputs from it" in out
    assert "epoch 1/2" not in out and "resuming" not in out
    assert comparable(again) == comparable(first) and again["resumed_at_epochs"] == []
    rewritten = again["provenance"].pop("outputs_rewritten")
    assert again["provenance"] == first["provenance"] and rewritten["host"] and rewritten["at"]
    assert (tmp_path / "model.pth").read_bytes() == weights and verify_weights(tmp_path / "model.pth")
    monkeypatch.setattr("kdlab.train.code_sha256", lambda: "other code")
    retrained = train(run, tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint is of a finished run of other code (kdlab or torch changed): starting fresh" in out
    assert "epoch 1/2" in out and "outputs_rewritten" not in retrained["provenance"]
    assert retrained["provenance"]["started"] >= first["provenance"]["finished"]


def test_a_checkpoint_of_other_data_is_not_resumed(tmp_path, capsys, monkeypatch):
    import kdlab.data
    run = tiny_run(training={"epochs": 2})
    interrupt_after_checkpoints(kdlab.train, 1, train, run, tmp_path)
    monkeypatch.setattr(kdlab.data.ImageArrays, "sha256", lambda self: "other data")
    metrics = train(run, tmp_path)
    assert "checkpoint was trained on other data (the dataset's files changed): starting fresh" in \
        capsys.readouterr().out
    assert metrics["resumed_at_epochs"] == []


def test_checkpoint_minutes_spaces_the_checkpoints_and_changes_nothing_else(tmp_path, monkeypatch):
    real_save, saved = kdlab.train.save_checkpoint, []
    monkeypatch.setattr(kdlab.train, "save_checkpoint", lambda path, obj: (saved.append(obj["epoch"]),
                                                                          real_save(path, obj)))
    every = train(tiny_run(training={"epochs": 3, "milestones": [2]}), tmp_path / "every")
    assert saved == [1, 2, 3]
    saved.clear()
    spaced = train(tiny_run(training={"epochs": 3, "milestones": [2], "checkpoint_minutes": 1440}), tmp_path / "spaced")
    assert saved == [3]  # only the finished run's: the last epoch's is always written
    # A clock that reads 40 s later at every look: with 1 minute, epochs 2 and 4 are due (counted
    # from the last checkpoint, not the start), and the last.
    saved.clear()
    clock = itertools.count(0, 40)
    monkeypatch.setattr(kdlab.train, "time", types.SimpleNamespace(monotonic=lambda: next(clock),
                                                                   perf_counter=time.perf_counter))
    train(tiny_run(training={"epochs": 5, "milestones": [4], "checkpoint_minutes": 1}), tmp_path / "clocked")
    assert saved == [2, 4, 5]
    # A runtime key: the same fingerprint, history and weights.
    assert spaced["provenance"]["fingerprint"] == every["provenance"]["fingerprint"]
    assert comparable(spaced)["history"] == comparable(every)["history"]
    assert (tmp_path / "spaced" / "model.pth").read_bytes() == (tmp_path / "every" / "model.pth").read_bytes()


def test_a_resumed_run_says_running_before_its_next_checkpoint(tmp_path, monkeypatch):
    run = tiny_run(training={"epochs": 3, "milestones": [2]})
    interrupt_after_checkpoints(kdlab.train, 2, train, run, tmp_path)  # progress.json is epoch 1's
    kdlab.train.mark_interrupted(tmp_path, "Ctrl-C")
    assert read_json(tmp_path / "progress.json")["status"] == "interrupted"
    real_evaluate, seen = kdlab.train.evaluate, []

    def evaluate(*args):  # a look at progress.json in the resumed process's first epoch
        seen.append(read_json(tmp_path / "progress.json")["status"])
        return real_evaluate(*args)
    monkeypatch.setattr(kdlab.train, "evaluate", evaluate)
    train(tiny_run(training={"epochs": 3, "milestones": [2], "checkpoint_minutes": 1440}), tmp_path)
    assert seen[0] == "running"  # not the last process's "interrupted", for up to checkpoint_minutes


def test_the_fingerprint_is_what_a_run_computes():
    # Workers and device do not change the result: not part of the fingerprint.
    from kdlab.config import fingerprint, resolve_run
    a = fingerprint(resolve_run(tiny_run()), {})
    assert a == fingerprint(resolve_run(tiny_run(training={"num_workers": 3})), {})
    assert a != fingerprint(resolve_run(tiny_run(training={"lr": 0.1})), {})


# A run in a subprocess that SIGKILLs itself at a chosen instant (the kill is the test's,
# the code under test is unchanged).
KILLER = r"""
import io, json, os, signal, sys, torch
torch.set_num_threads(1)
import kdlab.runio as runio
run, run_dir, point = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
writes = {"n": 0}
original = runio.atomic_write
def write(path, writer):
    if str(path).endswith(point.split(":")[0]):
        writes["n"] += 1
        if writes["n"] == int(point.split(":")[1]):
            if point.endswith("mid-write"):  # half of the temporary file, then death
                data = io.BytesIO()
                writer(data)
                with open(os.path.join(run_dir, ".checkpoint.pth.partial.tmp"), "wb") as f:
                    f.write(data.getvalue()[: len(data.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return original(path, writer)
runio.atomic_write = write  # every kdlab file is written through it
from kdlab.train import train
train(run, run_dir)
"""


def run_killed(run, run_dir, point):
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(run), str(run_dir), point],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def kill_at_random_instant(run, run_dir, after_epochs, delay):
    proc = subprocess.Popen([sys.executable, "-c", KILLER, json.dumps(run), str(run_dir), "never:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    progress = run_dir / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and read_json(progress)["epochs_done"] >= after_epochs:
            break
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for workers in (0, 2):
        run = tiny_run(training={"epochs": 4, "milestones": [3], "num_workers": workers})
        runs[workers] = (run, comparable(train(run, tmp_path_factory.mktemp(f"ref{workers}"))))
    return runs


@pytest.mark.parametrize("workers,kill", [
    (0, "checkpoint.pth:2"),            # after the temp file is complete, before the rename
    (0, "checkpoint.pth:2:mid-write"),  # halfway through writing the temporary file
    (0, "metrics.json:1"),              # at completion, before metrics.json exists
    (0, "random:1"),                    # an arbitrary instant inside epoch 2
    (2, "random:2"),                    # the same with DataLoader worker processes
])
def test_killed_run_resumes_to_identical_metrics(uninterrupted, tmp_path, workers, kill):
    run, reference = uninterrupted[workers]
    if kill.startswith("random"):
        kill_at_random_instant(run, tmp_path, after_epochs=int(kill.split(":")[1]), delay=0.15)
    else:
        run_killed(run, tmp_path, kill)
    assert not (tmp_path / "metrics.json").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # never corrupt
    metrics = train(run, tmp_path)
    assert metrics["resumed_at_epochs"] == [ckpt["epoch"]] and ckpt["epoch"] >= 1
    assert metrics["provenance"]["resumes"][0]["after"].startswith("killed without a chance to say why")
    assert comparable(metrics) == reference
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("progress,stopped_by", [
    (None, None),
    ({"status": "running"}, "killed without a chance to say why"),
    ({"status": "complete"}, "killed without a chance to say why"),  # between progress.json and the last checkpoint
    ({"status": "interrupted", "error": "interrupted by Ctrl-C; ..."}, "interrupted by Ctrl-C; ..."),
    ({"status": "failed", "error": "the guard's message"}, "the guard's message"),
])
def test_a_resume_records_how_the_process_before_stopped(tmp_path, progress, stopped_by):
    from kdlab.train import why_it_stopped
    if progress is not None:
        (tmp_path / "progress.json").write_text(json.dumps(progress))
    said = why_it_stopped(tmp_path)
    assert said is None if stopped_by is None else said.startswith(stopped_by)


def test_guard_stops_a_nonfinite_loss_outside_amp(poison_method, trained_teacher, tmp_path):
    poison_method(lambda call: call >= 13)  # 10 steps per epoch: epoch 2, step 3
    run = tiny_run(kind="distill", method="poison", alpha=0.5, teacher="ResNet8",
                   teacher_weights=str(trained_teacher[0] / "model.pth"))
    with pytest.raises(GuardError, match=r"health guard: method 'poison', epoch 2, step 3: loss term 'poison' "
                                         r"went non-finite; amp is 'off'"):
        train(run, tmp_path)
    progress = read_json(tmp_path / "progress.json")
    assert progress["status"] == "failed" and "'poison'" in progress["error"] and progress["epochs_done"] == 1
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1  # last good one kept
    assert not (tmp_path / "metrics.json").exists()


def test_guard_counts_skipped_fp16_steps_then_stops(poison_method, trained_teacher, tmp_path):
    # 2 steps per epoch: epoch 1 poisons one step, then every step is poisoned until the
    # guard gives up after 2 skipped in a row.
    poison_method(lambda call: call == 1 or call >= 3)
    run = tiny_run(kind="distill", method="poison", alpha=0.5, teacher="ResNet8", seed=0,
                   teacher_weights=str(trained_teacher[0] / "model.pth"),
                   data={"synthetic": {"num_classes": 5, "train_size": 16, "test_size": 8, "seed": 0}},
                   training={"amp": "fp16", "epochs": 4, "batch_size": 8, "max_skipped_steps": 2})
    with pytest.raises(GuardError, match=r"method 'poison', epoch 2, step 2: 2 consecutive optimizer steps skipped "
                                         r"by the fp16 GradScaler; loss term 'poison' went non-finite"):
        train(run, tmp_path)
    progress = read_json(tmp_path / "progress.json")
    assert progress["history"]["skipped_steps"] == [1] and progress["history"]["nonfinite_losses"] == [1]
    assert progress["status"] == "failed"


def test_guard_stops_when_most_of_an_epochs_fp16_steps_are_skipped(poison_method, trained_teacher, tmp_path):
    # 4 steps per epoch; steps 1, 2 and 4 poisoned: never 3 in a row, but 3 of 4 skipped.
    poison_method(lambda call: call in (1, 2, 4))
    run = tiny_run(kind="distill", method="poison", alpha=0.5, teacher="ResNet8",
                   teacher_weights=str(trained_teacher[0] / "model.pth"),
                   data={"synthetic": {"num_classes": 5, "train_size": 32, "test_size": 8, "seed": 0}},
                   training={"amp": "fp16", "epochs": 2, "batch_size": 8, "max_skipped_steps": 3})
    with pytest.raises(GuardError, match=r"epoch 1: the fp16 GradScaler skipped 3 of 4 optimizer steps"):
        train(run, tmp_path)
    assert read_json(tmp_path / "progress.json")["status"] == "failed"


def test_guard_stops_when_the_fp16_loss_scale_collapses(poison_method, trained_teacher, tmp_path, monkeypatch):
    # Stand-in for many scattered overflows: one skipped step halves the scale below the floor.
    monkeypatch.setattr("kdlab.guard.MIN_LOSS_SCALE", 2.0 ** 16)
    poison_method(lambda call: call == 1)
    run = tiny_run(kind="distill", method="poison", alpha=0.5, teacher="ResNet8",
                   teacher_weights=str(trained_teacher[0] / "model.pth"),
                   data={"synthetic": {"num_classes": 5, "train_size": 16, "test_size": 8, "seed": 0}},
                   training={"amp": "fp16", "epochs": 2, "batch_size": 8})
    with pytest.raises(GuardError, match=r"epoch 1, step 2: the fp16 GradScaler's scale fell to 3.28e\+04"):
        train(run, tmp_path)
