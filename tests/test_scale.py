"""What the grid costs a shared cluster beyond its GPU hours: writes into the user's git
checkout, the PBS server's qstat calls. Cheap: no training."""
import os
import subprocess

from kdlab import runio


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
