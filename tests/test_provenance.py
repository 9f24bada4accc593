"""Provenance: a run's metrics.json names every process that trained it, and a git commit
only where kdlab runs from a checkout of its own."""

import os
import platform
import shutil
import subprocess
import sys

import torch

import kdlab.train
from kdlab.runio import code_sha256, git_state
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
    assert prov["teacher_outputs"] is None  # a teacher run reads no teacher
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



def test_a_run_resumed_from_a_checkpoint_of_an_earlier_kdlab_shows_both_codes(tmp_path, monkeypatch):
    """A run in progress when kdlab is updated: its checkpoint has no start record. The start
    is recorded with the checkpoint's code (the rest unknown), not as the resuming process's,
    so that kdlab results can name the run as one of mixed code."""
    from kdlab.results.health import build_health
    from kdlab.results.runs import summarize
    from kdlab.runio import load_checked, save_checked

    run = tiny_run(data={"synthetic": {"num_classes": 4, "train_size": 64, "test_size": 32, "seed": 1}},
                   training={"epochs": 2, "milestones": [1]})
    interrupt_after_checkpoints(kdlab.train, 1, train, run, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pth"
    ckpt = load_checked(path)
    for key in ("config", "provenance_at_start", "resumes"):
        ckpt["state"].pop(key, None)
    save_checked(path, {**ckpt, "code_sha256": "earlier code"})
    monkeypatch.setattr("socket.gethostname", lambda: "node-b")
    metrics = train(run, tmp_path / "run")
    prov = metrics["provenance"]
    assert (prov["code_sha256"], prov["host"], prov["pbs_job_id"], prov["threads"]) == ("earlier code", None, None,
                                                                                       None)
    assert prov["started"] and prov["data_sha256"] and prov["fingerprint"]  # what a resume must match
    [resume] = prov["resumes"]
    assert (resume["epoch"], resume["host"], resume["code_sha256"]) == (1, "node-b", code_sha256())
    summary = summarize(metrics, "Synthetic/teachers/ResNet8/0", "metrics.json")
    assert summary["code_sha256s"] == sorted(["earlier code", code_sha256()]) and summary["resumed_at"] == [1]
    assert [e["code_versions"] for e in build_health([summary])["mixed_code"]] == [2]


RUN_FROM_A_COPY = """
import kdlab.config as c, kdlab.runio as r
run = c.resolve_run({"kind": "teacher", "model": "ResNet8", "seed": 0, "method": "none",
                     "data": {"dataset": "Synthetic"}, "training": {}})
print(r.git_state(), r.code_sha256(), run["training"]["epochs"])
"""


def test_a_copy_of_the_package_alone_runs_and_tells_its_code_by_hash_not_by_anothers_commit(tmp_path):
    """kdlab's package directory alone, as a wheel (`pip install .`) or a tarball installs it,
    here inside another git repository (a home under git; the checkout's own .venv): it
    validates configs (the schema is package data) and reports no commit, not that
    repository's, but the checkout's code hash; the checkout reports its own commit."""
    outer = tmp_path / "home"
    copy = outer / "site-packages"
    shutil.copytree(REPO / "kdlab", copy / "kdlab", ignore=shutil.ignore_patterns("__pycache__"))  # links followed
    git = ["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "dotfiles"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    state = subprocess.run([sys.executable, "-c", RUN_FROM_A_COPY], cwd=copy, env=env, capture_output=True, text=True)
    assert state.stdout.split() == ["(None,", "None)", code_sha256(), "240"], state.stderr
    assert 'kdlab = ["config.schema.yaml"]' in (REPO / "pyproject.toml").read_text()  # what a wheel holds
    # Committed into that repository (kdlab kept in a larger project), its commit is kdlab's.
    subprocess.run([*git, "add", "site-packages"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "kdlab inside"], check=True)
    outer_commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    state = subprocess.run([sys.executable, "-c", RUN_FROM_A_COPY], cwd=copy, env=env, capture_output=True, text=True)
    assert state.stdout.split()[:2] == [f"('{outer_commit}',", "False)"], state.stderr
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_state()[0] == commit.strip()  # this test's kdlab is the checkout's


def test_on_the_cpu_deterministic_and_num_workers_leave_every_bit_alike(tmp_path):
    """README: on the CPU two runs of one config are bit-identical with any num_workers, and
    `deterministic` (cuDNN's flags) changes nothing there."""
    small = {"synthetic": {"num_classes": 4, "train_size": 64, "test_size": 32, "seed": 1}}
    results = []
    for deterministic, workers in ((True, 0), (False, 2)):
        run = tiny_run(data=small, training={"epochs": 2, "milestones": [1], "deterministic": deterministic,
                                             "num_workers": workers})
        metrics = comparable(train(run, tmp_path / str(workers)))
        del metrics["config"]
        results.append((metrics, (tmp_path / str(workers) / "model.pth.sha256").read_text().split()[0]))
    assert results[0] == results[1]
