"""Provenance: a run's metrics.json names every process that trained it, and a git commit
only where kdlab runs from a checkout of its own."""

import os
import platform
import shutil
import subprocess
import sys

import torch

import kdlab.train
from kdlab.runio import code_sha256
from kdlab.train import train

from conftest import REPO, comparable, interrupt_after_checkpoints, tiny_run


def test_a_resumed_run_records_the_process_that_started_it_and_each_resume(tmp_path, monkeypatch, capsys):
    """A run killed on one node and resumed on another, in another PBS job, by changed code
    (an unfinished checkpoint does not refuse it) and with other threads: both are on record."""
    run = tiny_run(data={"synthetic": {"num_classes": 4, "train_size": 64, "test_size": 32, "seed": 1}},
                   training={"epochs": 2, "milestones": [1]})
    reference = train(run, tmp_path / "reference")
    monkeypatch.setenv("PBS_JOBID", "111.pbs")
    monkeypatch.setattr("socket.gethostname", lambda: "node-a")
    interrupt_after_checkpoints(kdlab.train, 1, train, run, tmp_path / "run")
    monkeypatch.setenv("PBS_JOBID", "222.pbs")
    monkeypatch.setattr("socket.gethostname", lambda: "node-b")
    resumer = {**run, "training": {**run["training"], "num_workers": 2}}  # a runtime key: resumes as well
    capsys.readouterr()
    metrics = train(resumer, tmp_path / "run")
    assert "WARNING: the checkpoint was written by other code" not in capsys.readouterr().out
    assert comparable(metrics) == comparable(reference)  # what started the run: num_workers 0
    prov = metrics["provenance"]
    assert (prov["host"], prov["pbs_job_id"], prov["code_sha256"]) == ("node-a", "111.pbs", code_sha256())
    assert prov["python_version"] == platform.python_version() and prov["threads"] == torch.get_num_threads()
    assert prov["fingerprint"] and prov["runtime"]["training"]["num_workers"] == 0
    [resume] = prov["resumes"]
    assert (resume["epoch"], resume["host"], resume["pbs_job_id"]) == (1, "node-b", "222.pbs")
    assert resume["runtime"]["training"]["num_workers"] == 2 and resume["code_sha256"] == code_sha256()

    interrupt_after_checkpoints(kdlab.train, 1, train, run, tmp_path / "changed")
    monkeypatch.setattr("kdlab.train.code_sha256", lambda: "other code")
    monkeypatch.setattr("kdlab.runio.code_sha256", lambda: "other code")
    capsys.readouterr()
    metrics = train(run, tmp_path / "changed")
    assert "WARNING: the checkpoint was written by other code (kdlab or torch changed): its 1 epoch(s)" in \
        capsys.readouterr().out
    assert metrics["provenance"]["code_sha256"] == code_sha256()
    assert [r["code_sha256"] for r in metrics["provenance"]["resumes"]] == ["other code"]


GIT_STATE = "import kdlab.runio as r; print(r.git_state())"


def test_git_commit_only_from_a_checkout_of_kdlab_itself(tmp_path):
    """A tarball or `pip install .` inside another repository (a home under git, the checkout's
    own .venv) reports no commit, not that repository's; the checkout reports its own."""
    outer = tmp_path / "home"
    copy = outer / "kdlab-0.1.0"
    shutil.copytree(REPO / "kdlab", copy / "kdlab", ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "dotfiles"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    state = subprocess.run([sys.executable, "-c", GIT_STATE], cwd=copy, env=env, capture_output=True, text=True)
    assert state.stdout.strip() == "(None, None)", state.stderr
    state = subprocess.run([sys.executable, "-c", GIT_STATE], cwd=REPO, env=env, capture_output=True, text=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert state.stdout.startswith(f"('{commit.strip()}', "), state.stderr
