"""What the grid costs a shared cluster beyond its GPU hours: writes into the user's git
checkout, the PBS server's qstat calls. Cheap: no training."""
import os
import subprocess

from conftest import REPO, tiny_run
from kdlab import runio
from kdlab.config import resolve_run


def test_provenance_reads_git_without_taking_the_index_lock(tmp_path, monkeypatch):
    """Every job records the commit and whether the checkout is dirty; a plain `git status`
    takes .git/index.lock and rewrites a stale index, so hundreds of jobs starting at once
    would make the user's `git commit` on the login node fail on that lock."""
    repo = tmp_path / "repo"
    source = repo / "kdlab" / "runio.py"
    source.parent.mkdir(parents=True)
    source.write_text("# kdlab\n")
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "kdlab"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    mtime = source.stat().st_mtime + 100  # same content, newer stat: the index is stale (a checkout on another node)
    os.utime(source, (mtime, mtime))
    index = repo / ".git" / "index"
    before = index.read_bytes()
    monkeypatch.setattr(runio, "__file__", str(source))
    assert runio.git_state() == (head, False)
    assert index.read_bytes() == before


def test_the_io_benchmark_measures_the_checkpoint_a_run_writes(capsys, tmp_path, trained_teacher, monkeypatch):
    """bench/bench_io.py's checkpoint of a run (weights, method state, optimizer) is the one that
    training writes, less the run's small state (history, config, provenance)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_io
    run_dir, _ = trained_teacher
    written = (run_dir / "checkpoint.pth").stat().st_size
    run = resolve_run(tiny_run(training={"epochs": 4, "milestones": [3]}))
    measured = bench_io.size_of(bench_io.checkpoint_of(run, 5, 320, tmp_path))
    assert 0 <= written - measured < 20000, (written, measured)
    bench_io.main([str(REPO / "config" / "demo.yaml"), "--train-size", "1000", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "config/demo.yaml: 29 jobs" in out and "save_checkpoint of the largest checkpoint" in out
