"""The Snakemake workflow: plan, demo end to end, reruns, resume after a kill."""

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from kdlab.config import load_grid
from kdlab.grid import expand_grid, logs_dir
from kdlab.train import train

from conftest import REPO, comparable, read_json
from test_config import expected_counts

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
# The demo, shrunk: one pair of tiny nets, one seed, one alpha, two epochs.
OVERLAY = {
    "data": {"synthetic": {"num_classes": 5, "train_size": 160, "test_size": 80}},
    "pairs": [{"teacher": "ResNet8", "student": "ResNet8"}],
    "seeds": [0], "alphas": [0.5],
    "methods": {"ft": {"paraphraser_epochs": 1}},
    "training": {"epochs": 2, "milestones": [1]},
    "teacher_training": {"epochs": 2, "milestones": [1]},
}
DISTILL = "experiments/Synthetic/{}/alpha_0.5/ResNet8_to_ResNet8/0"


def snakemake(workdir, *args, overlay=None, check=True, timeout=600):
    configs = [str(REPO / "config" / "demo.yaml"), str(workdir / "overlay.yaml")]
    if overlay is not None:
        (workdir / "extra.yaml").write_text(yaml.safe_dump(overlay))
        configs.append(str(workdir / "extra.yaml"))
    cmd = ["snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           "--configfile", *configs, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc.output = proc.stdout + proc.stderr
    return proc


def planned(output):
    """Jobs per rule from Snakemake's 'Job stats' table."""
    table = output.split("Job stats:")[1] if "Job stats:" in output else ""
    return collections.Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
                                if m[1] not in ("total", "all")})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shrunk demo, run once per worker and shared by its tests, in whatever order xdist gives them:
    a test that needs the runs as the demo's config leaves them calls up_to_date first (other tests
    rerun runs under changed settings), and the first run's logs are kept in first_run_logs/."""
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    proc = snakemake(workdir)
    shutil.copytree(workdir / "logs", workdir / "first_run_logs")
    return workdir, proc.stdout + proc.stderr


def up_to_date(workdir):
    """The demo's runs as its own config makes them (earlier tests may have rerun some under other settings)."""
    snakemake(workdir)


def test_plan_of_the_group_grid_and_lint():
    grid = load_grid(REPO / "config" / "config.yaml")
    expected = {**expected_counts(grid), "aggregate": 1}
    proc = subprocess.run(["snakemake", "-n", "--quiet", "rules"], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert planned(proc.stdout + proc.stderr) == collections.Counter(expected)
    assert expected["distill"] == 4 * 3 * 3 * 3  # the group's four methods, alphas, pairs, seeds
    lint = subprocess.run(["snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_config_file_with_a_key_given_twice_stops_the_workflow_naming_it(tmp_path):
    (tmp_path / "overlay.yaml").write_text("seeds: [0]\nseeds: [1]\n")  # Snakemake's loader keeps the last
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.output
    assert f"cannot read the config {tmp_path / 'overlay.yaml'}: key 'seeds' appears twice" in proc.output


def test_another_experiments_dir_keeps_its_logs_apart(tmp_path):
    """config.yaml and crd.yaml run from one directory have runs of the same names (the teachers): the logs of
    experiments_crd/ go to logs/experiments_crd/, not over those of experiments/ in logs/."""
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump({**OVERLAY, "experiments_dir": "./runs_crd/"}))
    output = snakemake(tmp_path, "-n").output
    assert "log: logs/runs_crd/train_teacher/Synthetic/ResNet8/0.log" in output
    assert "log: logs/runs_crd/distill/Synthetic/kd/alpha_0.5/ResNet8_to_ResNet8/0.log" in output
    assert "benchmark: logs/runs_crd/benchmarks/train_student/Synthetic/ResNet8/0.tsv" in output
    assert "log: logs/runs_crd/aggregate.log" in output and "log: logs/train" not in output


def test_a_read_file_that_is_a_dangling_symlink_is_named_with_what_to_do(tmp_path):
    """Teacher weights (or cache, paraphraser) that are a symlink to a file gone (a purged scratch) stopped
    Snakemake with 'Unable to obtain modification time ... a concurrent process has deleted it'."""
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    weights = tmp_path / "experiments/Synthetic/teachers/ResNet8/0/model.pth"
    weights.parent.mkdir(parents=True)
    weights.symlink_to("/scratch/purged/model.pth")
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "concurrent process" not in proc.output, proc.output[-2000:]
    assert ("kdlab: experiments/Synthetic/teachers/ResNet8/0/model.pth is a symbolic link to /scratch/purged/"
            "model.pth, which does not exist: remove the link (rm) and run snakemake again") in proc.output
    weights.unlink()
    assert "train_teacher" in planned(snakemake(tmp_path, "-n").output)


def test_every_experiments_dir_gets_logs_of_its_own():
    assert logs_dir("experiments") == logs_dir("./experiments/") == "logs"
    assert logs_dir("experiments_crd") == logs_dir("experiments_crd/") == "logs/experiments_crd"
    assert re.fullmatch(r"logs/scratch_me_kd-[0-9a-f]{8}", logs_dir("/scratch/me/kd"))
    paths = ["a_b", "a/b", "a/b/..", "a", "../a", "../../a", "/a", ".", "..", "experiments/x", "x/experiments"]
    names = {logs_dir(p) for p in paths}
    assert len(names) == len(paths) - 1 and "logs" not in names  # a/b/.. is a


def test_crd_recipe_plans_every_method_in_its_additive_form(tmp_path):
    """config/crd.yaml: one run of each method and recipe, planned through the wildcards."""
    jobs = [j for j in expand_grid(load_grid(REPO / "config" / "crd.yaml")) if j.rule == "distill"]
    targets = {}
    for job in jobs:
        method, recipe = job.outputs[0].split("/")[2:4]
        targets.setdefault((method, recipe), job.outputs[0])
    assert set(targets) == {("kd", "additive_ce0.1_kd0.9"), ("fitnets", "additive_ce1_kd0"),
                            ("rkd", "additive_ce1_kd0"), ("ft", "additive_ce1_kd0"),
                            ("crd", "additive_ce1_kd0"), ("crd", "additive_ce1_kd1")} | {
        (m, "additive_ce1_kd0") for m in ("at", "sp", "pkt", "cc", "nst", "vid", "dkd", "dist")}
    proc = subprocess.run(["snakemake", *targets.values(), "-n", "--quiet", "rules", "--snakefile",
                           str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--configfile", str(REPO / "config" / "crd.yaml")], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert planned(proc.stdout + proc.stderr)["distill"] == len(targets)


def test_demo_runs_end_to_end_and_a_second_run_does_nothing(demo):
    workdir, output = demo
    grid = load_grid(REPO / "config" / "demo.yaml")
    for method in grid["methods"]:
        run = workdir / DISTILL.format(method)
        assert read_json(run / "metrics.json")["status"] == "complete" and (run / "model.pth").exists()
    for run in ("experiments/Synthetic/teachers/ResNet8/0", "experiments/Synthetic/none/ResNet8/0"):
        assert (workdir / run / "metrics.json").exists() and (workdir / run / "model.pth").exists()
    assert list((workdir / "experiments/Synthetic/teachers/ResNet8/0").glob("paraphraser_*/paraphraser.pth"))
    for name in ("results.csv", "results.md", "health.md", "health.json", "accuracy_vs_alpha.png",
                 "methods_at_best_alpha.png"):
        assert (workdir / "results" / name).stat().st_size > 0
    first_logs = workdir / "first_run_logs"
    assert (first_logs / "distill/Synthetic/kd/alpha_0.5/ResNet8_to_ResNet8/0.log").read_text().count("epoch ") >= 2
    assert (first_logs / "benchmarks/train_teacher/Synthetic/ResNet8/0.tsv").exists()
    up_to_date(workdir)
    again = snakemake(workdir)
    assert "Nothing to be done" in again.output


def test_forcerun_distill_reruns_only_distillations_from_their_finished_checkpoints(demo):
    """The same code and config: each forced run's outputs come from its finished checkpoint
    (no epoch is trained again; other code retrains: test_train). Forced: KD, FitNets (a feature
    method), FT (its paraphraser) and CRD (its memory bank) of the rule's thirteen jobs (a minute)."""
    workdir, _ = demo
    up_to_date(workdir)
    teacher = workdir / "experiments/Synthetic/teachers/ResNet8/0/metrics.json"
    before = teacher.stat().st_mtime_ns
    methods = ("kd", "fitnets", "ft", "crd")
    earlier = {m: read_json(workdir / DISTILL.format(m) / "metrics.json") for m in methods}
    proc = snakemake(workdir, "-R", "distill", "--", *(DISTILL.format(m) + "/metrics.json" for m in methods))
    assert planned(proc.output) == collections.Counter({"distill": len(methods)})
    assert teacher.stat().st_mtime_ns == before
    for method in methods:
        log = (workdir / f"logs/distill/Synthetic/{method}/alpha_0.5/ResNet8_to_ResNet8/0.log").read_text()
        assert "holds this run, finished by the same code: writing its outputs from it" in log
        assert "| lr " not in log  # no epoch line: nothing trained
        assert comparable(read_json(workdir / DISTILL.format(method) / "metrics.json")) == comparable(earlier[method])


def test_deleted_metrics_or_changed_setting_reruns_exactly_those_runs(demo):
    workdir, _ = demo
    up_to_date(workdir)
    (workdir / DISTILL.format("rkd") / "metrics.json").unlink()
    proc = snakemake(workdir, "-n")
    assert planned(proc.output) == collections.Counter({"distill": 1, "aggregate": 1})
    assert DISTILL.format("rkd") + "/metrics.json" in proc.output
    snakemake(workdir)
    # A method's setting: only that method's runs (and the aggregate).
    proc = snakemake(workdir, "-n", overlay={"methods": {"kd": {"temperature": 2.0}}})
    assert planned(proc.output) == collections.Counter({"distill": 1, "aggregate": 1})
    assert DISTILL.format("kd") in proc.output
    # Runtime settings (workers, device) change nothing that was computed: nothing reruns.
    proc = snakemake(workdir, "-n", overlay={"training": {"num_workers": 2}})
    assert "Nothing to be done" in proc.output


def test_a_method_version_bump_plans_exactly_that_methods_runs(demo):
    workdir, _ = demo
    up_to_date(workdir)
    # What a developer does when fixing a loss: VERSION += 1 in its module. The version is a
    # param of the distill rule, so Snakemake's params trigger sees it.
    bump = ("import sys, kdlab.methods.rkd as m; m.VERSION += 1; from snakemake.cli import main; "
            "sys.argv[0] = 'snakemake'; main()")
    cmd = [sys.executable, "-c", bump, "-n", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(REPO / "config/demo.yaml"), str(workdir / "overlay.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert planned(output) == collections.Counter({"distill": 1, "aggregate": 1})
    assert DISTILL.format("rkd") + "/metrics.json" in output and "params have changed" in output.lower()


def test_killed_distillation_resumes_from_its_checkpoint(demo, monkeypatch):
    workdir, _ = demo
    run = workdir / DISTILL.format("kd")
    longer = {"training": {"epochs": 5, "milestones": [4]}}
    target = DISTILL.format("kd") + "/metrics.json"
    configs = [str(REPO / "config/demo.yaml"), str(workdir / "overlay.yaml"), str(workdir / "extra.yaml")]
    (workdir / "extra.yaml").write_text(yaml.safe_dump(longer))
    cmd = ["snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1",
           "--configfile", *configs, "--allowed-rules", "distill", "--", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        progress = run / "progress.json"
        if progress.exists() and read_json(progress)["epochs_done"] >= 2 and read_json(progress)["status"] == "running":
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its job, as a node failure would
    proc.wait()
    epoch_at_kill = read_json(run / "progress.json")["epochs_done"]
    assert not (run / "metrics.json").exists() and 2 <= epoch_at_kill < 5
    snakemake(workdir, "--unlock", overlay=longer)  # a SIGKILLed Snakemake leaves its lock behind
    snakemake(workdir, "--allowed-rules", "distill", "--", target, overlay=longer)
    metrics = read_json(run / "metrics.json")
    assert metrics["resumed_at_epochs"] == [epoch_at_kill]
    log = (workdir / "logs/distill/Synthetic/kd/alpha_0.5/ResNet8_to_ResNet8/0.log").read_text()
    assert f"resuming from the checkpoint at epoch {epoch_at_kill}/5; the process before: killed without" in log
    assert metrics["provenance"]["resumes"][0]["after"].startswith("killed without a chance to say why (SIGKILL")
    # The same run, uninterrupted, gives the same metrics.
    monkeypatch.chdir(workdir)  # the run config's paths are relative to the workflow's directory
    reference = train(metrics["config"], workdir / "reference")
    assert comparable(metrics) == comparable(reference)


def test_report_is_a_single_html_page_with_table_and_figures(demo):
    workdir, _ = demo
    snakemake(workdir, "--report", str(workdir / "report.html"))
    html = (workdir / "report.html").read_text(errors="replace")
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:2000].lower()
    for name in ("results.md", "health.md", "accuracy_vs_alpha.png", "methods_at_best_alpha.png"):
        assert name in html


def test_jobs_run_with_snakemakes_interpreter_whatever_the_path(demo):
    workdir, _ = demo
    # `.venv/bin/snakemake ...` without activating the venv: PATH has no kdlab.
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", "--configfile", str(REPO / "config" / "demo.yaml"), str(workdir / "overlay.yaml"),
           "-R", "aggregate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bare, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Finished jobid" in proc.stderr and (workdir / "results" / "results.md").exists()


def test_after_a_hard_kill_of_snakemake_one_command_recovers(demo):
    """Snakemake SIGKILLed while its job runs on: the job writes metrics.json, Snakemake never
    records it, and the output stays marked incomplete. The workflow profile's
    rerun-incomplete makes `snakemake --unlock; snakemake` enough (README)."""
    workdir, _ = demo
    run = workdir / DISTILL.format("kd")
    changed = {"methods": {"kd": {"temperature": 3.0}}}  # reruns this run only
    (workdir / "extra.yaml").write_text(yaml.safe_dump(changed))
    target = DISTILL.format("kd") + "/metrics.json"
    configs = [str(REPO / "config/demo.yaml"), str(workdir / "overlay.yaml"), str(workdir / "extra.yaml")]
    cmd = ["snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1",
           "--configfile", *configs, "--allowed-rules", "distill", "--", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    def temperature(name):
        path = run / name
        return path.exists() and read_json(path)["config"]["method_settings"]["temperature"]
    while time.time() < deadline and temperature("progress.json") != 3.0:
        time.sleep(0.1)
    assert temperature("progress.json") == 3.0, "the distillation never started"
    os.kill(proc.pid, signal.SIGKILL)  # Snakemake only: its job runs on and completes
    proc.wait()
    while time.time() < deadline and temperature("metrics.json") != 3.0:
        time.sleep(0.1)
    assert temperature("metrics.json") == 3.0, "the orphaned job did not finish without Snakemake"
    time.sleep(1)  # the orphaned job's last writes
    snakemake(workdir, "--unlock", overlay=changed)
    without_profile = snakemake(workdir, "-n", "--workflow-profile", "none", overlay=changed, check=False)
    assert without_profile.returncode != 0 and "incomplete" in without_profile.output.lower()
    recovered = snakemake(workdir, overlay=changed)  # the default profile: rerun-incomplete
    assert "workflow specific profile" in recovered.output
    assert planned(recovered.output) == collections.Counter({"distill": 1, "aggregate": 1})
    assert read_json(run / "metrics.json")["status"] == "complete" and temperature("metrics.json") == 3.0
