"""Tests of the PBS profile (profiles/pbs) against a local PBS stand-in
(tests/pbs_standin: qsub/qstat/qdel that run jobs in the background and answer
in OpenPBS's formats; like a default OpenPBS server it keeps no job history
unless a test turns it on). No PBS server needed; runs on CPU in about three
minutes, most of it the real demo.
"""

import ast
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "pbs"
STANDIN = REPO / "tests" / "pbs_standin"
TEST_SNAKEFILE = STANDIN / "Snakefile"
VENV_BIN = REPO / ".venv" / "bin"
SNAKEMAKE = VENV_BIN / "snakemake"
if not SNAKEMAKE.exists():
    SNAKEMAKE = Path(sys.executable).parent / "snakemake"

sys.path.insert(0, str(PROFILE))
sys.path.insert(0, str(STANDIN))
pbs = importlib.import_module("pbs_lib")
standin = importlib.import_module("standin")

# Only timing is changed for the tests; job_history and vanished_grace keep
# the defaults of profiles/pbs/site.cfg unless a test sets them (site()).
TEST_SITE = """
[pbs]
status_poll_interval = 1
qstat_retries = 2
qstat_retry_sleep = 0.1
qstat_timeout = 10
"""


# ----------------------------------------------------------------- fixtures

@pytest.fixture
def pbs_env(tmp_path, monkeypatch):
    """Environment with the stand-in first on PATH and test site settings."""
    sdir = tmp_path / "standin"
    sdir.mkdir()
    site = tmp_path / "site-test.cfg"
    site.write_text(TEST_SITE)
    env = dict(os.environ)
    env["PATH"] = "%s:%s" % (STANDIN, env.get("PATH", "/usr/bin:/bin"))
    env["PBS_STANDIN_DIR"] = str(sdir)
    env["KDLAB_PBS_SITE"] = str(site)
    env.pop("SNAKEMAKE_PROFILE", None)
    env.pop("SNAKEMAKE_CLUSTER_SIDECAR_VARS", None)
    for key in ("PATH", "PBS_STANDIN_DIR", "KDLAB_PBS_SITE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("SNAKEMAKE_CLUSTER_SIDECAR_VARS", raising=False)
    yield env
    standin.cleanup(str(sdir))


def site(env, **settings):
    """The test's site settings: TEST_SITE plus these keys."""
    with open(env["KDLAB_PBS_SITE"], "w") as f:
        f.write(TEST_SITE + "".join("%s = %s\n" % kv for kv in settings.items()))


def set_control(env, **faults):
    with open(os.path.join(env["PBS_STANDIN_DIR"], "control.json"), "w") as f:
        json.dump(faults, f)


def read_log(env, name):
    path = os.path.join(env["PBS_STANDIN_DIR"], name + ".log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def qsub_requests(env):
    """{job name: [(walltime, select/nodes spec), ...]} from the recorded qsub calls."""
    out = {}
    for rec in read_log(env, "qsub"):
        argv = rec["argv"]
        name = argv[argv.index("-N") + 1]
        ls = [argv[i + 1] for i, a in enumerate(argv) if a == "-l"]
        wall = [x.split("=", 1)[1] for x in ls if x.startswith("walltime=")]
        spec = [x for x in ls if not x.startswith("walltime=")]
        out.setdefault(name, []).append((wall[0] if wall else None, spec))
    return out


def snakemake_cmd(workdir, *extra):
    return [
        str(SNAKEMAKE), "--profile", str(PROFILE), "-s", str(TEST_SNAKEFILE),
        "--directory", str(workdir),
        "--seconds-between-status-checks", "1", "--latency-wait", "5",
    ] + list(extra)


def run_snakemake(env, workdir, *extra, timeout=150):
    p = subprocess.run(snakemake_cmd(workdir, *extra), env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    return p.returncode, p.stdout


def wait_for(condition, seconds=60.0, every=0.2):
    """condition()'s first true value, asked every `every` s for up to `seconds` s (else its last)."""
    deadline = time.time() + seconds
    while True:
        value = condition()
        if value or time.time() >= deadline:
            return value
        time.sleep(every)


def ctrl_c_snakemake(env, workdir, *extra, when, settle=0.0):
    """Snakemake in its own session, interrupted like Ctrl-C in a terminal (SIGINT to its whole
    process group) once when() holds (or after 60 s), `settle` s later: (exit code, output, when's value)."""
    # SIGINT at its default, as from a terminal: a test suite started in the background
    # (`make test &`, some CI runners) inherits it ignored, and Snakemake would ignore Ctrl-C.
    p = subprocess.Popen(snakemake_cmd(workdir, *extra), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = wait_for(when)
        time.sleep(settle)
        os.killpg(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, seen


def starts(workdir, run_dir):
    with open(os.path.join(str(workdir), run_dir, "starts.txt")) as f:
        return [int(x) for x in f.read().split()]


def status(env, jobid, extra_env=None):
    e = dict(env)
    e.update(extra_env or {})
    p = subprocess.run([str(PROFILE / "pbs-status"), jobid], env=e, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                       cwd=e.get("_cwd"))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    return lines[0]


# ----------------------------------------------------------------- profile files

def test_profile_commands_are_bare_existing_executables():
    import yaml

    cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert cfg["executor"] == "cluster-generic"
    for key in ("submit", "status", "cancel", "sidecar"):
        value = cfg["cluster-generic-%s-cmd" % key]
        # Snakemake rewrites the value to <profile>/<value> only if it is an existing
        # path as a whole: no arguments allowed
        assert " " not in value
        path = PROFILE / value
        assert path.is_file() and os.access(str(path), os.X_OK), path
        assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert cfg["retries"] >= 1
    assert cfg["max-status-checks-per-second"] > 0


def test_profile_code_is_python36_compatible():
    for path in [PROFILE / "pbs_lib.py"] + [PROFILE / ("pbs-" + n) for n in
                                             ("submit", "status", "cancel", "sidecar")]:
        ast.parse(path.read_text(), feature_version=(3, 6))


def test_site_cfg_defaults_match_code():
    s = pbs.load_settings([str(PROFILE / "site.cfg")])
    for key in ("resource_syntax", "gpu_resource", "job_history", "qstat_json", "log_dir",
                "job_name_max_length", "job_shell", "vanished_grace"):
        assert s[key] == pbs.DEFAULTS[key], key


# ----------------------------------------------------------------- submit: request building

@pytest.mark.parametrize("raw,expected", [
    ("distill.Cifar100.rkd.0.5.ResNet110.ResNet20.0", "distill.Cifar100.rkd.0.5.ResNet110.ResNet20.0"),
    ("distill.alpha=0.5,seed=1", "distill.alpha-0.5-seed-1"),
    ("train teacher/x y", "train-teacher-x-y"),
    ("0abc", "j0abc"),
    ("_x", "j_x"),
    ("", "j"),
    ("a;rm -rf $HOME`x`", "a-rm-rf-HOME-x"),
    ("Model+v2.1e-05", "Model+v2.1e-05"),
])
def test_sanitize_job_name(raw, expected):
    assert pbs.sanitize_job_name(raw) == expected


def test_sanitize_job_name_length_limit_keeps_names_distinct():
    a = pbs.sanitize_job_name("distill.Cifar100.rkd.0.5.ResNet110.ResNet20.0", 15)
    b = pbs.sanitize_job_name("distill.Cifar100.rkd.0.5.ResNet110.ResNet20.1", 15)
    assert len(a) <= 15 and len(b) <= 15 and a != b
    assert re.match(r"^[A-Za-z][A-Za-z0-9._+-]*$", a)
    long_name = "distill." + "x" * 300
    assert len(pbs.sanitize_job_name(long_name)) == 236


@pytest.mark.parametrize("minutes,expected", [
    (1, "00:01:00"), (90, "01:30:00"), (720, "12:00:00"), (2880, "48:00:00"),
    (1.5, "00:01:30"), (0.1, "00:01:00"), ("45", "00:45:00"),
])
def test_walltime_from_minutes(minutes, expected):
    assert pbs.minutes_to_walltime(minutes) == expected


def single_props(threads=4, **resources):
    return {"type": "single", "rule": "distill", "threads": threads,
            "wildcards": {"method": "rkd", "alpha": "0.5", "seed": "0"},
            "resources": resources, "jobid": 7}


def test_request_select_form():
    s = pbs.load_settings([str(PROFILE / "site.cfg")])
    args, summary = pbs.build_request(single_props(4, mem_mb=16000, runtime=720, gpu=1, gpu_share=25), s)
    assert args == ["-l", "select=1:ncpus=4:ngpus=1:mem=16000mb", "-l", "walltime=12:00:00"]
    assert summary == {"ncpus": 4, "ngpus": 1, "mem_mb": 16000, "walltime": "12:00:00"}


def test_request_torque_form_and_site_options():
    s = pbs.load_settings([str(PROFILE / "site.cfg")])
    s.update(resource_syntax="nodes", gpu_resource="gpus", queue="cpuq", gpu_queue="gpuq",
             account="proj1", extra_qsub_args="-W group_list=kd -m n", select_extra=":gpu_model=a100")
    argv, summary = pbs.build_qsub_argv(single_props(2, mem_mb=4000, runtime=30, gpu=1), s,
                                        "distill.x", "/tmp/job.sh", "/tmp/out")
    assert argv[:7] == ["qsub", "-N", "distill.x", "-q", "gpuq", "-A", "proj1"]
    assert ["-l", "nodes=1:ppn=2:gpus=1:gpu_model=a100"] == argv[7:9]
    assert ["-l", "mem=4000mb", "-l", "walltime=00:30:00"] == argv[9:13]
    assert argv[-5:] == ["-W", "group_list=kd", "-m", "n", "/tmp/job.sh"]
    # CPU-only job: the CPU queue, no GPU part
    argv, summary = pbs.build_qsub_argv(single_props(2, mem_mb=4000, runtime=30, gpu=0), s,
                                        "x", "/tmp/job.sh", "/tmp/out")
    assert argv[3:5] == ["-q", "cpuq"] and "nodes=1:ppn=2:gpu_model=a100" in argv


def test_request_walltime_clamped_to_site_maximum():
    s = pbs.load_settings([str(PROFILE / "site.cfg")])
    s["max_walltime"] = "48:00:00"
    args, summary = pbs.build_request(single_props(runtime=720 * 8), s)
    assert summary["walltime"] == "48:00:00"


@pytest.mark.parametrize("resources,expected", [
    ({"gpu": 1}, 1),
    ({"gpu": 1, "gpu_share": 25}, 1),          # a single job: one whole GPU
    ({"gpu": 4, "gpu_share": 100}, 1),         # 4 packed jobs, 25 % each: ONE GPU
    ({"gpu": 3, "gpu_share": 75}, 1),
    ({"gpu": 8, "gpu_share": 200}, 2),
    ({"gpu": 4}, 4),                           # no share declared: summed gpu
    ({"gpu": 0, "gpu_share": 25}, 0),          # CPU-only configuration
    ({}, 0),
    ({"gpu_share": 50}, 1),
])
def test_gpu_count_for_single_and_group_jobs(resources, expected):
    assert pbs.count_gpus(resources) == expected


def test_group_job_name_and_request():
    s = pbs.load_settings([str(PROFILE / "site.cfg")])
    props = {"type": "group", "groupid": "pack", "threads": 16, "jobid": "4899f629-04ab",
             "resources": {"mem_mb": 64000, "runtime": 600, "gpu": 4, "gpu_share": 100}}
    text = ("#!/bin/sh\n# properties = {}\ncd /w && python -m snakemake --target-jobs "
            "'distill:seed=0' 'distill:seed=1' 'distill:seed=2' 'distill:seed=3' --allowed-rules distill "
            "--cores all --attempt 2\n")
    assert pbs.job_name(props, text) == "pack.distill.x4.4899f629"
    assert pbs.exec_details(text)["attempt"] == "2"
    args, summary = pbs.build_request(props, s)
    assert args == ["-l", "select=1:ncpus=16:ngpus=1:mem=64000mb", "-l", "walltime=10:00:00"]


def test_submit_show_request_and_job_script(tmp_path, pbs_env):
    jobscript = tmp_path / "snakejob.distill.7.sh"
    props = single_props(4, mem_mb=2000, runtime=5, gpu=1, gpu_share=25)
    props["wildcards"] = {"method": "rkd", "alpha": "0.5", "x": "a b;c"}
    jobscript.write_text("#!/bin/sh\n# properties = %s\necho hello --cores 'all'\n" % json.dumps(props))
    p = subprocess.run([str(PROFILE / "pbs-submit"), "--show-request", str(jobscript)],
                       stdout=subprocess.PIPE, universal_newlines=True, cwd=str(tmp_path),
                       env=pbs_env, check=True)
    assert "-N distill.rkd.0.5.a-b-c" in p.stdout
    assert "select=1:ncpus=4:ngpus=1:mem=2000mb" in p.stdout and "walltime=00:05:00" in p.stdout
    # a real submission to the stand-in: the first (only) line is the job id
    p = subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, cwd=str(tmp_path),
                       env=pbs_env, check=True)
    assert re.match(r"^\d+\.server\n$", p.stdout), p.stdout
    jobid = p.stdout.strip()
    log = tmp_path / "logs" / "pbs" / ("distill.rkd.0.5.a-b-c.%s.log" % jobid)
    exitfile = tmp_path / "logs" / "pbs" / "exit" / jobid
    wait_for(exitfile.exists, seconds=10, every=0.1)
    assert exitfile.read_text().split()[0] == "0"
    # the start marker, and the job's command got the cores PBS gave it (NCPUS)
    assert (tmp_path / "logs" / "pbs" / "start" / jobid).read_text().strip()
    assert "hello --cores 4\n" in log.read_text()
    # a GPU job on a node where PBS (no cgroups hook) assigned no GPU device says so
    assert "WARNING: PBS set no CUDA_VISIBLE_DEVICES" in log.read_text()
    script = read_log(pbs_env, "qsub")[0]["argv"][-1]
    subprocess.run(["bash", "-n", script], check=True)


def test_a_machine_without_pbs_is_named_in_one_line(tmp_path, pbs_env):
    """`--profile profiles/pbs` on a laptop: the sidecar says so once, at the start, and every
    submission fails with that line (not a bare "[Errno 2]" inside Snakemake's error blocks)."""
    env = dict(pbs_env, PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")  # no stand-in qsub, qstat
    expected = ("qsub and qstat not found (PATH, or site.cfg): this machine has no PBS client, so no job can be "
                "submitted. Run on the cluster's login node, or here without the profile: snakemake --cores all")
    jobscript = tmp_path / "snakejob.distill.1.sh"
    jobscript.write_text("#!/bin/sh\n# properties = %s\necho hello\n" % json.dumps(single_props(1, runtime=5)))
    p = subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], capture_output=True, text=True,
                       cwd=str(tmp_path), env=env, timeout=30)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "pbs-submit: %s\n" % expected)
    sidecar = subprocess.Popen([str(PROFILE / "pbs-sidecar")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=str(tmp_path), env=env)
    try:
        assert json.loads(sidecar.stdout.readline())["pid"] == sidecar.pid  # it still serves Snakemake
    finally:
        sidecar.terminate()
    assert sidecar.communicate(timeout=30)[1] == "kdlab PBS profile: %s (Ctrl-C stops Snakemake)\n" % expected


def test_the_sidecar_removes_the_state_of_sidecars_killed_with_sigkill(tmp_path, pbs_env):
    """A new sidecar with a dead one's pid took over its list of jobs, and qdel'd them on Ctrl-C."""
    state = tmp_path / ".snakemake" / "pbs"
    dead, live = state / ("sidecar.%d" % (2**22 + 1)), state / ("sidecar.%d" % os.getpid())  # above pid_max's limit
    for d in (dead, live):
        (d / "active").mkdir(parents=True)
        (d / "active" / "1065.server").write_text("")
    sidecar = subprocess.Popen([str(PROFILE / "pbs-sidecar")], stdout=subprocess.PIPE, text=True,
                               cwd=str(tmp_path), env=pbs_env)
    try:
        sidecar.stdout.readline()
        assert not dead.exists() and (live / "active" / "1065.server").exists()
    finally:
        sidecar.terminate()
        sidecar.communicate(timeout=30)


def test_ctrl_c_during_a_status_call_does_not_kill_it(tmp_path, pbs_env):
    """Ctrl-C reaches the whole process group, a status call too: killed, it left cluster-generic
    without an answer ("cannot access local variable 'ret'") and Snakemake's cancel did not run."""
    d = pbs_env["PBS_STANDIN_DIR"]
    standin.fake_job(d, 900, state="R", substate=42)
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "qstat").write_text('#!/bin/sh\nsleep 1\nexec %s "$@"\n' % (STANDIN / "qstat"))
    (slow / "qstat").chmod(0o755)
    env = dict(pbs_env, PATH="%s:%s" % (slow, pbs_env["PATH"]))
    p = subprocess.Popen([str(PROFILE / "pbs-status"), "900.server"], env=env, cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out) == (0, "running\n"), err


def test_submit_reattaches_to_its_job_still_in_pbs_and_only_to_that(tmp_path, pbs_env):
    """A restarted Snakemake that submits a job whose PBS job of an earlier run is still
    queued gets that job's id back (no second job training on the same checkpoint); once
    that job has left PBS, or for another job, pbs-submit submits as usual."""
    set_control(pbs_env, queue_delay=60)  # the first job stays queued

    def submit(rule, output="experiments/x/model.pth"):
        jobscript = tmp_path / ("snakejob.%s.1.sh" % rule)
        props = single_props(1, runtime=5)
        props.update(rule=rule, output=[output, output.replace("model.pth", "metrics.json")])
        jobscript.write_text("#!/bin/sh\n# properties = %s\necho hello\n" % json.dumps(props))
        p = subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, cwd=str(tmp_path),
                           env=pbs_env, check=True, timeout=30)
        return p.stdout.strip(), p.stderr

    first, _ = submit("train_teacher")
    again, message = submit("train_teacher")
    assert again == first and "watching it instead of submitting it again" in message
    assert len(read_log(pbs_env, "qsub")) == 1
    assert "re-attached to PBS job %s" % first in (tmp_path / "logs" / "pbs" / "status.log").read_text()
    other, _ = submit("distill", output="experiments/y/model.pth")
    assert other != first and len(read_log(pbs_env, "qsub")) == 2
    # The same rule and wildcards (so the same name) in another config's experiments_dir,
    # run at the same time from this directory: another job, not the first config's.
    crd, message = submit("train_teacher", "experiments_crd/x/model.pth")
    assert crd not in (first, other) and "watching" not in message and len(read_log(pbs_env, "qsub")) == 3
    subprocess.run(["qdel", crd], env=pbs_env, check=True, timeout=10)
    subprocess.run(["qdel", first], env=pbs_env, check=True, timeout=10)
    wait_for(lambda: first not in [j["id"] for j in standin.all_jobs(pbs_env["PBS_STANDIN_DIR"])
                                   if j["state"] in ("Q", "R")], seconds=10, every=0.1)
    fresh, message = submit("train_teacher")
    assert fresh not in (first, other, crd) and "watching" not in message
    assert len(read_log(pbs_env, "qsub")) == 4


def test_a_restart_with_other_packs_watches_or_waits_for_the_jobs_that_make_its_outputs(tmp_path, pbs_env):
    """Packs (--groups) are named by their composition, which a restart changes (a member that
    finished meanwhile, another --group-components): the look-up goes by outputs. A job whose
    outputs an earlier job still makes is watched; one that shares only some waits for it
    (qsub -W depend=afterany), instead of meeting its run lock and failing, after which Snakemake
    removed the outputs the earlier job had written."""
    set_control(pbs_env, queue_delay=60)  # the earlier jobs stay queued

    def submit(runs, seeds):
        props = {**single_props(1, runtime=5), "output": [f"exp/{r}/metrics.json" for r in runs]}
        if len(runs) > 1:
            props.update(type="group", groupid="pack", jobid="6943559e-04ab")
        jobscript = tmp_path / "snakejob.pack.1.sh"
        targets = " ".join(f"'distill:seed={seed}'" for seed in seeds)
        jobscript.write_text("#!/bin/sh\n# properties = %s\ncd /w && python -m snakemake --target-jobs %s "
                             "--allowed-rules distill --cores all --attempt 1\n" % (json.dumps(props), targets))
        p = subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], capture_output=True, text=True,
                           cwd=str(tmp_path), env=pbs_env, timeout=30)
        return p.returncode, p.stdout.strip(), p.stderr

    _, pack, _ = submit(["a", "b"], [0, 1])
    _, again, message = submit(["b"], [1])  # a finished meanwhile: a pack of one, or a job of its own
    assert again == pack and "watching it instead of submitting it again" in message
    _, later, message = submit(["b", "c"], [1, 2])  # b with a run the earlier pack does not make
    assert later != pack and "watching" not in message
    qsubs = read_log(pbs_env, "qsub")
    assert len(qsubs) == 2 and qsubs[-1]["argv"][:2] == ["-W", "depend=afterany:" + pack]
    status_log = (tmp_path / "logs" / "pbs" / "status.log").read_text()
    assert f"submitted to start after {pack} of an earlier run" in status_log
    assert message.startswith(f"pbs-submit: pack.distill.x2.6943559e submitted to start after {pack} ")
    # That waiting pack deleted (qdel, a Ctrl-C): it must not hide the earlier pack from the next restart
    subprocess.run(["qdel", later], env=pbs_env, check=True, timeout=10)
    wait_for(lambda: later not in [j["id"] for j in standin.all_jobs(pbs_env["PBS_STANDIN_DIR"])
                                   if j["state"] in ("Q", "R", "H")], seconds=10, every=0.1)
    _, later, _ = submit(["b", "c"], [1, 2])
    assert read_log(pbs_env, "qsub")[-1]["argv"][:2] == ["-W", "depend=afterany:" + pack]
    # qstat cannot say whether the earlier jobs still run: no second job, and why
    set_control(pbs_env, queue_delay=60, qstat_fail_until=time.time() + 60)
    rc, out, message = submit(["c"], [2])
    assert (rc, out) == (1, "") and len(read_log(pbs_env, "qsub")) == 3
    assert message.startswith("pbs-submit: qstat does not answer whether an earlier job for ") and \
        f"{later} (" in message and "not submitting a second one" in message


def test_a_pack_too_large_for_snakemake_to_list_its_outputs_is_looked_up_by_name(tmp_path, pbs_env):
    """Past 100 outputs Snakemake lists none: such packs must not all count as making the same files."""
    set_control(pbs_env, queue_delay=60)

    def submit(seed):
        props = {**single_props(1, runtime=5), "type": "group", "groupid": "pack", "jobid": "%d-04ab" % seed,
                 "output": None}
        jobscript = tmp_path / "snakejob.pack.1.sh"
        jobscript.write_text("#!/bin/sh\n# properties = %s\ncd /w && python -m snakemake --target-jobs "
                             "'distill:seed=%d' --cores all\n" % (json.dumps(props), seed))
        return subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], capture_output=True, text=True,
                              cwd=str(tmp_path), env=pbs_env, timeout=30, check=True).stdout.strip()

    first = submit(1)
    assert submit(2) != first and submit(1) == first and len(read_log(pbs_env, "qsub")) == 2


def test_submit_asks_qstat_only_about_an_earlier_job_that_has_not_ended(tmp_path, pbs_env):
    """The look-up of the earlier job of the same name (above) costs a qstat per submission;
    a retry or a restart whose earlier job wrote its exit-code file needs none (a restart of
    the grid would otherwise be a qstat per job, 10 a second)."""
    def submit():
        jobscript = tmp_path / "snakejob.distill.1.sh"
        jobscript.write_text("#!/bin/sh\n# properties = %s\necho hello\n" % json.dumps(single_props(1, runtime=5)))
        return subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], stdout=subprocess.PIPE,
                              universal_newlines=True, cwd=str(tmp_path), env=pbs_env, check=True,
                              timeout=30).stdout.strip()

    first = submit()
    assert wait_for((tmp_path / "logs" / "pbs" / "exit" / first).exists, seconds=20)  # it ran and ended
    qstat_calls = len(read_log(pbs_env, "qstat"))
    assert submit() != first
    assert len(read_log(pbs_env, "qstat")) == qstat_calls and len(read_log(pbs_env, "qsub")) == 2


def test_submit_removes_files_of_an_earlier_job_with_the_same_id(tmp_path, pbs_env):
    """PBS reuses job ids (max_job_sequence_id wraps, a reinstalled server starts over):
    an old exit-code file "0" would make the new job, if deleted while queued, a success."""
    for kind, text in (("exit", "0 \n"), ("start", "2025-01-01 10:00:00 node1\n")):
        old = tmp_path / "logs" / "pbs" / kind / "1000.server"
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_text(text)
        os.utime(str(old), (time.time() - 86400 * 200,) * 2)
    set_control(pbs_env, queue_delay=60)   # the stand-in's counter starts at 1000
    jobscript = tmp_path / "snakejob.distill.7.sh"
    jobscript.write_text("#!/bin/sh\n# properties = %s\necho hello\n" % json.dumps(single_props(1, runtime=5)))
    p = subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], stdout=subprocess.PIPE,
                       universal_newlines=True, cwd=str(tmp_path), env=pbs_env, check=True, timeout=30)
    assert p.stdout == "1000.server\n"
    assert not (tmp_path / "logs" / "pbs" / "exit" / "1000.server").exists()
    assert not (tmp_path / "logs" / "pbs" / "start" / "1000.server").exists()
    subprocess.run(["qdel", "1000.server"], env=pbs_env, check=True, timeout=10)   # while queued
    assert status(dict(pbs_env, _cwd=str(tmp_path)), "1000.server") == "failed"


@pytest.mark.parametrize("message,tries", [
    ("qsub: cannot connect to server pbs01 (errno=15010)", 3),   # server restarting: no job made
    ("qsub: Unknown queue", 1),                                  # refused: asking again won't help
])
def test_submit_retries_qsub_only_when_the_server_was_not_reached(tmp_path, pbs_env, message, tries):
    count = tmp_path / "qsub.count"
    fake = tmp_path / "qsub"
    fake.write_text('#!/bin/bash\nn=$(cat %s 2>/dev/null || echo 0); echo $((n + 1)) > %s\n'
                    'if [ "$n" -lt 2 ]; then echo "%s" >&2; exit 162; fi\nexec %s "$@"\n'
                    % (count, count, message, STANDIN / "qsub"))
    fake.chmod(0o755)
    site(pbs_env, qsub=str(fake), qsub_retry_sleep=0.1)
    jobscript = tmp_path / "snakejob.distill.7.sh"
    jobscript.write_text("#!/bin/sh\n# properties = %s\necho hello\n" % json.dumps(single_props(1, runtime=5)))
    p = subprocess.run([str(PROFILE / "pbs-submit"), str(jobscript)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, cwd=str(tmp_path),
                       env=pbs_env, timeout=30)
    assert int(count.read_text()) == tries
    if tries == 3:
        assert p.returncode == 0 and re.match(r"^\d+\.server\n$", p.stdout), p.stderr
        assert "could not reach the server" in (tmp_path / "logs" / "pbs" / "status.log").read_text()
    else:
        assert p.returncode == 1 and p.stdout == "" and "Unknown queue" in p.stderr


# ----------------------------------------------------------------- status: parsing

JSON_OUT = {
    "timestamp": 1700000000, "pbs_version": "22.05.11", "pbs_server": "server",
    "Jobs": {
        "12.server": {"Job_Name": "a", "job_state": "F", "substate": 92, "Exit_status": 0,
                      "comment": "Job run at ... and finished", "run_count": 1},
        "13.server": {"job_state": "F", "substate": 93, "Exit_status": -29,
                      "comment": "Job run at ... and exceeded resource walltime"},
        "14.server": {"job_state": "R", "substate": 42},
    },
}


def test_parse_qstat_json():
    jobs = pbs.parse_qstat_json(json.dumps(JSON_OUT))
    assert pbs.classify(jobs["12.server"]) == ("success", "exit status 0")
    st, reason = pbs.classify(jobs["13.server"])
    assert st == "failed" and "walltime" in reason
    assert pbs.classify(jobs["14.server"])[0] == "running"
    # a differing server suffix still matches
    assert pbs.find_job(jobs, "12.server.cluster.org") is jobs["12.server"]
    assert pbs.find_job(jobs, "112.server") is None


@pytest.mark.parametrize("bad", [
    '{"Jobs": {"1.server": {"Variable_List": {"X": "a"b"}}}}',
    "<html>502</html>",
    "[1, 2]",
])
def test_parse_qstat_json_rejects_invalid(bad):
    with pytest.raises(ValueError):
        pbs.parse_qstat_json(bad)


def test_parse_qstat_text_with_wrapped_lines():
    text = (
        "Job Id: 15.server\n"
        "    Job_Name = distill.Cifar100.rkd.0.5\n"
        "    job_state = F\n"
        "    comment = Job run at Mon Jan 01 at 10:00 on (node1:ncpus=4:ngpus=1) and exceed\n"
        "\ted resource walltime\n"
        "    Exit_status = -29\n"
        "    substate = 93\n"
        "\n"
        "Job Id: 16.server\n"
        "    job_state = Q\n"
        "    Variable_List = PBS_O_HOME=/home/u,X=\"quoted\",BASH_FUNC_x%%=() {  echo\n"
        "\t }\n"
    )
    jobs = pbs.parse_qstat_text(text)
    assert jobs["15.server"]["exit_status"] == "-29"
    assert "exceeded resource walltime" in jobs["15.server"]["comment"]
    assert pbs.classify(jobs["15.server"])[0] == "failed"
    assert pbs.classify(jobs["16.server"])[0] == "running"
    with pytest.raises(ValueError):
        pbs.parse_qstat_text("qstat: <garbage>\n%%%")
    # Torque: job_state C, lower-case exit_status
    torque = "Job Id: 17.head.cluster\n    job_state = C\n    exit_status = 0\n"
    assert pbs.classify(pbs.parse_qstat_text(torque)["17.head.cluster"])[0] == "success"


@pytest.mark.parametrize("state", list("QRHWTSUEBM"))
def test_every_active_state_is_running(state):
    assert pbs.classify({"job_state": state, "run_count": 2})[0] == "running"


@pytest.mark.parametrize("code,expected,words", [
    (0, "success", ""),
    (1, "failed", "Snakemake"),
    (-29, "failed", "walltime"),
    (-27, "failed", "memory"),
    (-11, "failed", "rerun"),
    (271, "failed", "SIGTERM"),
    (143, "failed", "after SIGTERM (walltime/memory limit or qdel)"),   # qdel: the script's trap
    (265, "failed", "SIGKILL"),
])
def test_exit_status_meanings(code, expected, words):
    st, reason = pbs.classify({"job_state": "F", "substate": 92, "Exit_status": code})
    assert st == expected and words in reason


@pytest.mark.parametrize("code,words", [(271, "killed by SIGTERM (walltime exceeded)"),
                                        (143, "after SIGTERM (walltime exceeded)")])
def test_walltime_named_from_the_comment_whoever_exited(code, words):
    """A walltime kill's comment names it, whether PBS killed the shell (271) or the job
    script's trap exited on the SIGTERM (143, before OpenPBS 22.05)."""
    entry = {"job_state": "F", "substate": 93, "Exit_status": code,
             "comment": "job killed: walltime 3720 exceeded limit 3600"}
    assert words in pbs.classify(entry)[1]


def test_finished_without_exit_status():
    assert pbs.classify({"job_state": "F", "substate": 91})[0] == "failed"
    assert pbs.classify({"job_state": "F", "substate": 92}, (0, ""))[0] == "success"
    assert pbs.classify({"job_state": "F", "substate": 92}, (271, "SIGTERM"))[0] == "failed"


# ----------------------------------------------------------------- status: the program

def test_status_program_against_standin(tmp_path, pbs_env):
    d = pbs_env["PBS_STANDIN_DIR"]
    set_control(pbs_env, history=True)
    env = dict(pbs_env, _cwd=str(tmp_path))
    for num, state, sub, code in [(1, "Q", 10, None), (2, "R", 42, None), (3, "H", 20, None),
                                  (4, "E", 51, None), (5, "F", 92, 0), (6, "F", 93, -29),
                                  (7, "F", 93, 265), (8, "F", 92, 2), (9, "F", 91, None),
                                  (10, "Q", 10, None)]:
        standin.fake_job(d, num, state=state, substate=sub, exit_status=code,
                         run_count=1 if num == 10 else 0)
    expected = {1: "running", 2: "running", 3: "running", 4: "running", 5: "success",
                6: "failed", 7: "failed", 8: "failed", 9: "failed", 10: "running"}
    for num, want in expected.items():
        assert status(env, "%d.server" % num) == want, num
    log = (tmp_path / "logs" / "pbs" / "status.log").read_text()
    assert "6.server failed: Exit_status -29: killed: walltime exceeded" in log
    assert "7.server failed: Exit_status 265: job shell killed by SIGKILL" in log
    assert "5.server succeeded: exit status 0" in log
    assert "job history on" in log   # learned from qmgr


def write_job_files(workdir, jobid, start=True, exit_code=None, note=""):
    """What a job leaves behind: its start marker and, at its end, its exit-code file."""
    logs = Path(str(workdir)) / "logs" / "pbs"
    if start:
        (logs / "start").mkdir(parents=True, exist_ok=True)
        (logs / "start" / jobid).write_text("2026-01-01 10:00:00 node1\n")
    if exit_code is not None:
        (logs / "exit").mkdir(parents=True, exist_ok=True)
        (logs / "exit" / jobid).write_text("%d %s\n" % (exit_code, note))


@pytest.mark.parametrize("server_history", [False, True], ids=["server-without-history", "server-with-history"])
@pytest.mark.parametrize("setting", ["auto", "yes", "no"])
def test_jobs_qstat_does_not_list_are_decided_at_once(tmp_path, pbs_env, setting, server_history):
    """Whatever the server keeps and whatever site.cfg says: a finished job is
    judged by its exit-code file, one that never started (deleted while queued,
    or an id Snakemake resumes from an earlier run) is failed at once, and only
    a job that started but left no exit-code file waits for vanished_grace."""
    d = pbs_env["PBS_STANDIN_DIR"]
    set_control(pbs_env, history=server_history)
    if setting != "auto":
        site(pbs_env, job_history=setting)
    env = dict(pbs_env, _cwd=str(tmp_path))
    write_job_files(tmp_path, "601.server", exit_code=0)
    write_job_files(tmp_path, "602.server", exit_code=271, note="SIGTERM")
    write_job_files(tmp_path, "605.server")
    if server_history:   # the server still lists them (qstat -x)
        standin.fake_job(d, 601, state="F", substate=92, exit_status=0)
        standin.fake_job(d, 602, state="F", substate=93, exit_status=271)
        standin.fake_job(d, 603, state="F", substate=91)     # deleted while queued
    t = time.time()
    assert status(env, "601.server") == "success"
    assert status(env, "602.server") == "failed"
    assert status(env, "603.server") == "failed"   # deleted while queued: no file at all
    assert status(env, "604.server") == "failed"   # from an earlier run, unknown to the server
    assert time.time() - t < 10
    # started, then gone without an exit-code file: vanished_grace (60 s by default)
    if not server_history:
        assert status(env, "605.server") == "running"
    log = (tmp_path / "logs" / "pbs" / "status.log").read_text()
    assert "604.server failed: not listed by qstat, no start marker and no exit-code file: " \
           "it never started" in log
    if setting == "auto":
        learned = json.loads((tmp_path / ".snakemake" / "pbs" / "job_history.json").read_text())
        assert learned["history"] is server_history
        assert learned["why"].startswith("qmgr")
    else:
        assert not read_log(pbs_env, "qmgr")
    uses_x = {"yes": True, "no": False, "auto": server_history}[setting]
    calls = read_log(pbs_env, "qstat")
    if setting == "yes" and not server_history:   # the server refused -x: `yes` gives way
        uses_x = False
        assert "-x" in calls[0]["argv"]
        calls = calls[1:]
    assert all(("-x" in c["argv"]) == uses_x for c in calls)


@pytest.mark.parametrize("server_history", [False, True])
def test_job_history_learned_from_qstat_when_qmgr_refuses(tmp_path, pbs_env, server_history):
    d = pbs_env["PBS_STANDIN_DIR"]
    set_control(pbs_env, history=server_history, qmgr=False)
    env = dict(pbs_env, _cwd=str(tmp_path))
    if server_history:   # the first job has ended
        standin.fake_job(d, 700, state="F", substate=92, exit_status=0)
    write_job_files(tmp_path, "700.server", exit_code=0)
    assert status(env, "700.server") == "success"
    assert status(env, "701.server") == "failed"
    learned = json.loads((tmp_path / ".snakemake" / "pbs" / "job_history.json").read_text())
    assert learned["history"] is server_history, learned
    calls = [c["argv"] for c in read_log(pbs_env, "qstat")]
    assert "-x" in calls[0]   # unknown at first: asked with -x, whose answer tells
    assert ("-x" in calls[-1]) is server_history
    log = (tmp_path / "logs" / "pbs" / "status.log").read_text()
    assert "job history not known yet" in log and "qmgr did not tell" in log
    if not server_history:
        assert "job history off" in log and "not configured to maintain job history" in log


@pytest.mark.parametrize("setting", ["auto", "yes"])
def test_qstat_x_refused_by_server_without_history_says_nothing_about_jobs(tmp_path, pbs_env,
                                                                         monkeypatch, setting):
    """OpenPBS without job history rejects every `qstat -x` request as a whole, for queued
    and running jobs too (exit 0, no job listed, "not configured to maintain job history").
    That answer must not make them look gone: with history unknown (auto, qmgr refused)
    or wrongly forced to yes, a queued job was reported failed at once and resubmitted,
    and pbs-submit did not re-attach to it."""
    d = pbs_env["PBS_STANDIN_DIR"]
    set_control(pbs_env, history=False, qmgr=False)
    if setting != "auto":
        site(pbs_env, job_history=setting)
    env = dict(pbs_env, _cwd=str(tmp_path))
    standin.fake_job(d, 900, state="Q", name="train_teacher.T1.0")
    standin.fake_job(d, 901, state="R", substate=42)
    write_job_files(tmp_path, "901.server")
    assert status(env, "900.server") == "running"
    assert status(env, "901.server") == "running"
    assert not (tmp_path / ".snakemake" / "pbs" / "vanished" / "901.server").exists()
    calls = [c["argv"] for c in read_log(pbs_env, "qstat")]
    assert "-x" in calls[0] and all("-x" not in c for c in calls[1:]), calls   # refused once
    assert "job history off" in (tmp_path / "logs" / "pbs" / "status.log").read_text()
    # pbs-submit's re-attach after a restart (history not yet known in this session)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".snakemake" / "pbs" / "job_history.json").unlink()
    ledger = tmp_path / "logs" / "pbs" / "jobs.tsv"
    ledger.write_text("submitted\tjobid\tname\n2026-01-01 10:00:00\t900.server\ttrain_teacher.T1.0\n")
    assert pbs.earlier_jobs(pbs.load_settings(), str(ledger), "train_teacher.T1.0", ["o"]) == {"900.server": {"o"}}
    # the sidecar's first poll of a new session keeps watching both jobs
    (tmp_path / ".snakemake" / "pbs" / "job_history.json").unlink()
    active = tmp_path / "active"
    active.mkdir()
    for jobid in ("900.server", "901.server"):
        (active / jobid).write_text("")
    cache = {"jobs": {}}
    pbs.poll_once(pbs.load_settings(), str(active), cache, str(tmp_path / "sidecar.log"))
    assert {j: e.get("job_state") for j, e in cache["jobs"].items()} == {"900.server": "Q", "901.server": "R"}
    assert sorted(os.listdir(str(active))) == ["900.server", "901.server"]
    # a job PBS holds (it will not start it by itself) is logged once, not every round
    standin.fake_job(d, 900, state="H", name="train_teacher.T1.0", comment="job held, too many failed attempts to run")
    for _ in range(2):
        pbs.poll_once(pbs.load_settings(), str(active), cache, str(tmp_path / "sidecar.log"))
    held = [l for l in (tmp_path / "sidecar.log").read_text().splitlines() if "is held" in l]
    assert len(held) == 1 and "900.server" in held[0] and "too many failed attempts" in held[0]
    assert status(dict(env, SNAKEMAKE_CLUSTER_SIDECAR_VARS=""), "900.server") == "running"


def test_job_history_auto_on_torque(tmp_path, pbs_env):
    """Torque's `qstat -x` means XML: auto learns that there is no history to read."""
    d = pbs_env["PBS_STANDIN_DIR"]
    set_control(pbs_env, torque_qstat=True, qmgr=False)
    site(pbs_env, qstat_json="no")
    env = dict(pbs_env, _cwd=str(tmp_path))
    standin.fake_job(d, 800, state="R", substate=42)
    write_job_files(tmp_path, "801.server", exit_code=0)
    assert status(env, "800.server") == "running"
    assert status(env, "801.server") == "success"
    learned = json.loads((tmp_path / ".snakemake" / "pbs" / "job_history.json").read_text())
    assert learned["history"] is False and "qstat -x gave no usable answer" in learned["why"]
    assert [c["argv"][:2] for c in read_log(pbs_env, "qstat")] == [["-x", "-f"], ["-f", "800.server"],
                                                                   ["-f", "801.server"]]


def test_status_started_job_without_exit_code_file(tmp_path, pbs_env):
    site(pbs_env, vanished_grace=3)
    env = dict(pbs_env, _cwd=str(tmp_path))
    exitdir = tmp_path / "logs" / "pbs" / "exit"
    # started, no exit-code file: running during the grace period (3 s here), then failed
    write_job_files(tmp_path, "503.server")
    write_job_files(tmp_path, "504.server")
    assert status(env, "503.server") == "running"
    assert status(env, "504.server") == "running"
    write_job_files(tmp_path, "504.server", exit_code=0)   # the file arrives within the grace
    assert status(env, "504.server") == "success"
    time.sleep(3.2)
    assert status(env, "503.server") == "failed"
    # $PBS_JOBID with a longer server name than qsub printed
    write_job_files(tmp_path, "505.server.cluster.org", exit_code=0)
    assert status(env, "505.server") == "success"
    write_job_files(tmp_path, "506.server")
    (exitdir / "506.server.tmp.77").write_text("0 \n")   # half-written: not an exit-code file
    assert status(env, "506.server") == "running"
    log = (tmp_path / "logs" / "pbs" / "status.log").read_text()
    assert "503.server: not listed by qstat; it started but has no exit-code file yet" in log
    assert "503.server failed: not listed by qstat; it started but wrote no exit-code file within 3s" in log


def test_status_survives_qstat_failures_and_bad_output(tmp_path, pbs_env):
    d = pbs_env["PBS_STANDIN_DIR"]
    env = dict(pbs_env, _cwd=str(tmp_path))
    standin.fake_job(d, 20, state="F", substate=92, exit_status=0)
    set_control(pbs_env, history=True, qstat_fail_until=time.time() + 60)
    t = time.time()
    assert status(env, "20.server") == "running"   # retried, then reported running
    assert time.time() - t < 5
    set_control(pbs_env, history=True, qstat_garbage_until=time.time() + 60)
    assert status(env, "20.server") == "running"
    set_control(pbs_env, history=True, qstat_badjson_until=time.time() + 60)
    assert status(env, "20.server") == "success"   # falls back to plain qstat -f
    calls = [c["argv"] for c in read_log(pbs_env, "qstat")]
    assert calls[-2][-3:] == ["-F", "json", "20.server"] and "-F" not in calls[-1]
    set_control(pbs_env, history=True)
    assert status(env, "20.server") == "success"
    assert status(env, "not-a-job-id;rm") == "failed"
    log = (tmp_path / "logs" / "pbs" / "status.log").read_text()
    assert "qstat failed 2 times" in log


def test_status_reads_sidecar_cache(tmp_path, pbs_env):
    env = dict(pbs_env, _cwd=str(tmp_path))
    active = tmp_path / "active"
    active.mkdir()
    cache = tmp_path / "cache.json"
    now = time.time()
    cache.write_text(json.dumps({
        "updated": now, "attempted": now, "poll_started": now - 0.1, "error": None,
        "jobs": {"30.server": {"job_state": "F", "exit_status": 0},
                 "31.server": {"job_state": "R"},
                 "32.server": {"unknown": True, "was": "R"},
                 "34.server": {"unknown": True, "was": "Q"}}}))
    (active / "33.server").write_text("")
    side = {"SNAKEMAKE_CLUSTER_SIDECAR_VARS": json.dumps(
        {"cache": str(cache), "active": str(active), "interval": 1})}
    assert status(env, "30.server", side) == "success"
    assert status(env, "31.server", side) == "running"
    assert status(env, "32.server", side) == "running"   # seen running, then forgotten: grace
    assert status(env, "34.server", side) == "failed"    # forgotten without ever starting
    assert status(env, "33.server", side) == "running"   # submitted after last poll
    assert read_log(pbs_env, "qstat") == []               # none of these ran qstat
    # an old cache of a sidecar that is alive (its poll waits out a hanging qstat) is
    # still used: one qstat per job and round would pile onto that server
    cache.write_text(json.dumps({"updated": now - 40, "attempted": now - 40, "poll_started": now - 41,
                                 "jobs": {"31.server": {"job_state": "R"}}}))
    alive = {"SNAKEMAKE_CLUSTER_SIDECAR_VARS": json.dumps(
        {"cache": str(cache), "active": str(active), "interval": 1, "pid": os.getpid()})}
    assert status(env, "31.server", alive) == "running"
    assert read_log(pbs_env, "qstat") == []
    # a stale cache (sidecar gone) is ignored: qstat is asked directly
    cache.write_text(json.dumps({"updated": now - 100, "attempted": now - 100, "jobs": {
        "30.server": {"job_state": "R"}}}))
    set_control(pbs_env, history=True)
    standin.fake_job(pbs_env["PBS_STANDIN_DIR"], 30, state="F", substate=92, exit_status=0)
    assert status(env, "30.server", side) == "success"
    assert len(read_log(pbs_env, "qstat")) == 1


# ----------------------------------------------------------------- integration

def test_workflow_completes_on_standin(tmp_path, pbs_env):
    """Default settings on a server without job history whose qmgr we may not
    use: history is learned from the first `qstat -x` answer; a job deleted
    while queued is resubmitted at once."""
    wd = tmp_path / "wd"
    set_control(pbs_env, qmgr=False, delete_while_queued=[{"name_regex": r"^distill.*\.1$", "count": 1}])
    t = time.time()
    rc, out = run_snakemake(pbs_env, wd, "--config", "threads=2", "steps=4")
    elapsed = time.time() - t
    assert rc == 0, out
    assert (wd / "results" / "summary.txt").exists()
    req = qsub_requests(pbs_env)
    assert req["train_teacher.T1.0"] == [("00:01:00", ["select=1:ncpus=2:ngpus=1:mem=1000mb"])]
    assert req["distill.kd.0.5.T1.S1.0"] == [("00:01:00", ["select=1:ncpus=2:ngpus=1:mem=1500mb"])]
    # deleted while queued: failed at once (no start marker), resubmitted (attempt 2)
    assert [w for w, _ in req["distill.kd.0.5.T1.S1.1"]] == ["00:01:00", "00:02:00"]
    assert starts(wd, "experiments/Synthetic/kd/alpha_0.5/T1_to_S1/1") == [0]
    qsubs = [r for r in read_log(pbs_env, "qsub") if r["argv"][r["argv"].index("-N") + 1].endswith(".1")]
    assert qsubs[1]["time"] - qsubs[0]["time"] < 30   # the old profile waited 300 s
    status_log = (wd / "logs" / "pbs" / "status.log").read_text()
    assert "%s failed: not listed by qstat, no start marker" % qsubs[0]["jobid"] in status_log
    assert "job history off" in status_log and "not configured to maintain job history" in status_log
    assert not any(n.startswith("aggregate") for n in req)   # localrule: not submitted
    for rec in read_log(pbs_env, "qsub"):
        argv = rec["argv"]
        assert argv[argv.index("-j") + 1] == "oe"
        assert "/logs/pbs/pbs-output/" in argv[argv.index("-o") + 1]
    # per-job logs next to the rules' logs, named <jobname>.<jobid>.log
    logs = sorted(p.name for p in (wd / "logs" / "pbs").glob("*.log"))
    assert any(re.match(r"train_teacher\.T1\.0\.\d+\.server\.log$", n) for n in logs), logs
    # the job ran in the project's virtualenv (mimic_train checks it)
    teacher_log = (wd / "logs" / "train_teacher" / "T1_0.log").read_text()
    assert "(venv: True)" in teacher_log
    ledger = (wd / "logs" / "pbs" / "jobs.tsv").read_text().splitlines()
    assert len(ledger) == 5
    # the inner Snakemake got the job's cores (NCPUS), not the node's
    assert "[pbs-job] cores for the Snakemake job: 2\n" in (wd / "logs" / "pbs").joinpath(
        [n for n in logs if n.startswith("train_teacher")][0]).read_text()
    # status polling is cheap: one qstat per sidecar round for all jobs
    calls = read_log(pbs_env, "qstat")
    assert any(len([a for a in c["argv"] if a.endswith(".server")]) >= 2 for c in calls)
    assert len(calls) <= elapsed / 1.0 + 5


def test_faults_walltime_kill_history_off_and_bad_qstat(tmp_path, pbs_env):
    """job_history forced to no; a walltime kill, failing and garbled qstat, and a
    job deleted while queued."""
    wd = tmp_path / "wd"
    site(pbs_env, job_history="no")
    now = time.time()
    teacher_dir = "experiments/Synthetic/teachers/T1/0"
    set_control(
        pbs_env,
        history=False,                      # finished jobs vanish: qstat exit 153
        qstat_fail_until=now + 5,           # qstat cannot connect for 5 s,
        qstat_garbage_until=now + 9,        # then prints garbage,
        qstat_badjson_until=now + 40,       # then invalid JSON (plain text still fine)
        walltime_kill=[{"name_regex": "^train_teacher", "file": teacher_dir + "/train.log",
                        "contains": "step 3 saved", "count": 1}],
        delete_while_queued=[{"name_regex": r"^distill.*\.1$", "count": 1}],
    )
    rc, out = run_snakemake(pbs_env, wd, "--config", "steps=8")
    assert rc == 0, out
    assert (wd / "results" / "summary.txt").exists()
    req = qsub_requests(pbs_env)
    # killed by "walltime", resubmitted with a doubled walltime
    assert [w for w, _ in req["train_teacher.T1.0"]] == ["00:01:00", "00:02:00"]
    # ... and resumed from its checkpoint instead of starting over
    s = starts(wd, teacher_dir)
    assert len(s) == 2 and s[0] == 0 and 3 <= s[1] < 8, s
    for seed in (0, 1):
        assert starts(wd, "experiments/Synthetic/kd/alpha_0.5/T1_to_S1/%d" % seed) == [0]
    assert len(req["distill.kd.0.5.T1.S1.0"]) == 1
    assert len(req["distill.kd.0.5.T1.S1.1"]) == 2   # deleted while queued, resubmitted
    log = (wd / "logs" / "pbs" / "status.log").read_text()
    assert "qstat failed" in log
    assert "SIGTERM" in log
    assert "no start marker and no exit-code file: it never started" in log
    assert not read_log(pbs_env, "qmgr") and "job history" not in log   # forced: nothing learned


def test_packing_group_asks_for_one_gpu(tmp_path, pbs_env):
    """Also: job_history forced to yes on a server without history (the setting
    that used to hang the workflow)."""
    wd = tmp_path / "wd"
    site(pbs_env, job_history="yes")
    rc, out = run_snakemake(pbs_env, wd, "--config", "alphas=0.5,0.75", "seeds=0,1", "threads=1",
                            "steps=3", "--groups", "distill=pack", "--group-components", "pack=4")
    assert rc == 0, out
    req = qsub_requests(pbs_env)
    groups = [n for n in req if n.startswith("pack.")]
    assert len(groups) == 1 and groups[0].startswith("pack.distill.x4."), req
    assert req[groups[0]] == [("00:01:00", ["select=1:ncpus=4:ngpus=1:mem=6000mb"])]
    assert len(req) == 2   # the teacher and the one group job
    pack_log = next((wd / "logs" / "pbs").glob("pack.*.log")).read_text()
    assert "Provided cores: 4\n" in pack_log   # NCPUS, on a machine with fewer cores
    for a in ("0.5", "0.75"):
        for seed in (0, 1):
            assert (wd / "experiments/Synthetic/kd" / ("alpha_" + a) / "T1_to_S1" / str(seed)
                    / "model.json").exists()


def test_cancel_with_ctrl_c_calls_qdel(tmp_path, pbs_env):
    """Ctrl-C in a terminal: SIGINT to snakemake's whole process group."""
    wd = tmp_path / "wd"
    set_control(pbs_env, history=True)   # to see how the jobs ended
    d = pbs_env["PBS_STANDIN_DIR"]
    rc, out, running = ctrl_c_snakemake(pbs_env, wd, "--config", "steps=200", settle=1.0,
                                        when=lambda: [j["id"] for j in standin.all_jobs(d) if j["state"] == "R"])
    assert running, "no job started"
    assert rc != 0
    assert "Terminating processes on user request" in out
    deleted = [a for c in read_log(pbs_env, "qdel") for a in c["argv"]]
    assert set(running) <= set(deleted), (running, deleted, out)
    wait_for(lambda: all(j["state"] == "F" for j in standin.all_jobs(d)), seconds=5, every=0.1)
    jobs = standin.all_jobs(d)
    assert jobs and all(j["state"] == "F" and j["substate"] == 91 for j in jobs), jobs
    assert "qdel" in (wd / "logs" / "pbs" / "cancel.log").read_text()
    # the sidecar's state is cleaned up
    assert not list((wd / ".snakemake" / "pbs").glob("sidecar.*"))


def test_cancel_program_also_deletes_jobs_registered_with_sidecar(tmp_path, pbs_env):
    d = pbs_env["PBS_STANDIN_DIR"]
    for num in (40, 41, 42):
        standin.fake_job(d, num, state="Q")
    active = tmp_path / "sidecar" / "active"
    active.mkdir(parents=True)
    (active / "41.server").write_text("")
    (active / "42.server").write_text("")
    env = dict(pbs_env, SNAKEMAKE_CLUSTER_SIDECAR_VARS=json.dumps({"active": str(active)}))
    cancel = subprocess.run([str(PROFILE / "pbs-cancel"), "40.server"], env=env, cwd=str(tmp_path),
                            check=True, timeout=10, capture_output=True, text=True)
    assert cancel.stderr == ("pbs-cancel: qdel 40.server 41.server 42.server (their runs keep their checkpoints: "
                             "the same command again resumes them)\n")  # above Snakemake's error for each
    wait_for(lambda: read_log(pbs_env, "qdel"), seconds=5, every=0.1)
    assert read_log(pbs_env, "qdel")[0]["argv"] == ["40.server", "41.server", "42.server"]
    marker = (tmp_path / "sidecar" / "cancel").read_text().split()
    assert marker == ["40.server", "41.server", "42.server"]


def test_restart_after_snakemake_died_reattaches_running_job(tmp_path, pbs_env):
    """Snakemake killed hard while a training job runs; the restarted Snakemake must
    watch that PBS job instead of submitting a second one on the same checkpoint."""
    wd = tmp_path / "wd"
    d = pbs_env["PBS_STANDIN_DIR"]
    # 60 steps of 0.2 s: the job must outlast two Snakemake start-ups on a loaded machine
    # (with 30 it once finished first, and nothing was left to watch).
    cmd = snakemake_cmd(wd, "--config", "steps=60")
    p = subprocess.Popen(cmd, env=pbs_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        wait_for(lambda: any(j["state"] == "R" for j in standin.all_jobs(d)))
        time.sleep(0.5)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    first = [j["id"] for j in standin.all_jobs(d)]
    assert len(first) == 1 and standin.all_jobs(d)[0]["state"] == "R"
    subprocess.run(cmd + ["--unlock"], env=pbs_env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    rc, out = run_snakemake(pbs_env, wd, "--config", "steps=60")
    assert rc == 0, out
    # Snakemake resumes the job by its PBS id while the job's own Snakemake has not
    # yet taken over its bookkeeping (the first seconds), else pbs-submit re-attaches
    assert "watching it instead of submitting it again" in out or re.search(
        r"Resuming incomplete job \d+ with external jobid '%s'" % re.escape(first[0]), out), out
    assert len(qsub_requests(pbs_env)["train_teacher.T1.0"]) == 1
    assert starts(wd, "experiments/Synthetic/teachers/T1/0") == [0]
    assert (wd / "results" / "summary.txt").exists()


@pytest.mark.parametrize("setting", ["auto", "yes"])
def test_restart_resumes_job_deleted_while_queued(tmp_path, pbs_env, setting):
    """Ctrl-C while a job is queued qdels it: it never starts. The restarted
    Snakemake either resumes it by its PBS id, which the server (without history)
    no longer knows, so the profile reports it failed at once, or (the workflow
    profile's rerun-incomplete) submits it anew; either way it is submitted again
    within seconds (the old profile sat on it for vanished_grace, 300 s). `yes`
    was the old default, which hung on such a server; `no` is covered end to end
    by the faults test, and every setting by the status program's tests."""
    if setting != "auto":
        site(pbs_env, job_history=setting)
    wd = tmp_path / "wd"
    target = "experiments/Synthetic/teachers/T1/0/model.json"
    set_control(pbs_env, queue_delay=60)
    # `yes` also without the workflow profile: the plugin resumes the job by its PBS id.
    plain = ["--workflow-profile", "none"] if setting == "yes" else []
    _, out, _ = ctrl_c_snakemake(pbs_env, wd, target, "--config", "steps=2", *plain, when=lambda: any(
        "server" in f.read_text() for f in (wd / ".snakemake" / "incomplete").glob("*")))  # the PBS id registered
    first = read_log(pbs_env, "qsub")[0]["jobid"]
    assert first in [a for c in read_log(pbs_env, "qdel") for a in c["argv"]], out
    set_control(pbs_env)
    t = time.time()
    rc, out = run_snakemake(pbs_env, wd, target, "--config", "steps=2", *plain)
    assert rc == 0, out
    assert ("Resuming incomplete job" in out) == bool(plain), out
    qsubs = read_log(pbs_env, "qsub")
    assert len(qsubs) == 2 and qsubs[1]["time"] - t < 30
    assert starts(wd, "experiments/Synthetic/teachers/T1/0") == [0]
    if "Resuming incomplete job" in out:  # without rerun-incomplete: the profile decides at once
        assert "%s failed: not listed by qstat, no start marker" % first in \
            (wd / "logs" / "pbs" / "status.log").read_text()


# ----------------------------------------------------------------- the real workflow

REAL_READY = (REPO / "Snakefile").exists() and (REPO / "config" / "demo.yaml").exists() \
    and (VENV_BIN / "kdlab").exists()


@pytest.mark.skipif(not REAL_READY, reason="the real workflow / config/demo.yaml / kdlab not there yet")
def test_real_demo_through_profile(tmp_path, pbs_env):
    """The real workflow (config/demo.yaml, shrunk to KD and FT) through the profile with its
    default settings, on a stand-in server without job history: a teacher
    killed by "walltime" after its first epoch is resubmitted with twice the
    walltime and kdlab resumes it from its checkpoint; then a distilled student."""
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    # KD and FT (its paraphraser is a rule of its own): the other methods take the same rule as KD
    cfg.update(seeds=[0], alphas=[0.5], plain_students=False, methods={m: cfg["methods"][m] for m in ("kd", "ft")})
    cfg["training"].update(epochs=2, milestones=[1])
    cfg["teacher_training"] = {}
    cfg["data"].setdefault("synthetic", {}).update(train_size=256, test_size=64)
    pair = cfg["pairs"][0]
    config = tmp_path / "demo-small.yaml"
    config.write_text(yaml.safe_dump(cfg))
    wd = tmp_path / "wd"
    teacher = "experiments/Synthetic/teachers/%s/0" % pair["teacher"]
    target = "experiments/Synthetic/kd/alpha_0.5/%s_to_%s/0/metrics.json" % (pair["teacher"], pair["student"])
    set_control(pbs_env, walltime_kill=[{
        "name_regex": "^train_teacher", "file": teacher + "/progress.json",
        "contains": '"epochs_done": 1,', "count": 1}])
    env = dict(pbs_env, PATH="%s:%s" % (VENV_BIN, pbs_env["PATH"]))
    cmd = [str(SNAKEMAKE), "--profile", str(PROFILE), "-s", str(REPO / "Snakefile"),
           "--directory", str(wd), "--configfile", str(config),
           "--seconds-between-status-checks", "1", "--latency-wait", "5"]  # the whole (shrunk) demo
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=300)
    assert p.returncode == 0, p.stdout
    req = qsub_requests(pbs_env)
    name = "train_teacher.Synthetic.%s.0" % pair["teacher"]
    base = cfg.get("resources", {}).get("runtime", {}).get("train_teacher", 720)
    assert [w for w, _ in req[name]] == [pbs.minutes_to_walltime(base), pbs.minutes_to_walltime(2 * base)]
    assert req[name][0][1] == ["select=1:ncpus=%d:mem=%dmb" % (cfg["resources"]["threads"],
                                                               cfg["resources"]["mem_mb"])]
    metrics = json.loads((wd / teacher / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_done"] == 2
    assert metrics["resumed_at_epochs"] == [1], metrics["resumed_at_epochs"]
    first_job, resubmitted_job = [s.split("'")[0] for s in p.stdout.split("external jobid '")[1:3]]
    assert metrics["provenance"]["pbs_job_id"] == first_job  # the job that started it, then the one that resumed it
    assert [r["pbs_job_id"] for r in metrics["provenance"]["resumes"]] == [resubmitted_job]
    # the stand-in keeps no job history, like a default OpenPBS server: the
    # walltime kill is read from the job's exit-code file (SIGTERM from PBS)
    status_log = (wd / "logs" / "pbs" / "status.log").read_text()
    assert "job history off" in status_log
    assert "exit-code file: exit code 271: job shell killed by SIGTERM" in status_log
    student = json.loads((wd / target).read_text())
    assert student["status"] == "complete"
    for method in cfg["methods"]:  # every distillation, the paraphraser and the (local) aggregate
        assert (wd / target.replace("/kd/", "/%s/" % method)).exists()
    assert len(req["pretrain_paraphraser.Synthetic.%s.0.%s" % (pair["teacher"], "k0.5_l1_2ep_lr0.1")]) == 1
    assert (wd / "results" / "results.md").exists() and "aggregate" not in "".join(req)
    # Nothing left to do: Snakemake returns without shutting its executor down, and cluster-generic's
    # sidecar threads (not daemons) waited for that shutdown for ever.
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=60)
    assert p.returncode == 0 and "Nothing to be done" in p.stdout, p.stdout
    assert not list((wd / ".snakemake" / "pbs").glob("sidecar.*"))  # the sidecar stopped and cleaned up


def test_jobs_run_where_home_is_not_writable(tmp_path, pbs_env):
    """Compute nodes where $HOME is read-only, full, or not mounted at all: the Snakemake inside
    every job creates ~/.cache/snakemake at start, and failed there (OSError), so every job failed.
    The job then gets a cache directory of its own, removed at its end."""
    not_a_directory = tmp_path / "home-is-a-file"
    not_a_directory.write_text("")
    pbs_env.pop("XDG_CACHE_HOME", None)
    site(pbs_env, env_setup='. "{repo}/.venv/bin/activate"\n    export HOME=%s/home' % not_a_directory)
    wd = tmp_path / "wd"
    teacher = "experiments/Synthetic/teachers/T1/0/model.json"
    rc, out = run_snakemake(pbs_env, wd, "--config", "steps=2", "--", teacher)
    job_logs = "".join(p.read_text() for p in (wd / "logs" / "pbs").glob("*.log"))
    assert rc == 0, out + job_logs
    assert (wd / teacher).exists()
    own = re.findall(r"%s/home/.cache/snakemake cannot be written here: XDG_CACHE_HOME=(\S+)" % not_a_directory,
                     job_logs)
    assert len(own) == 1 and "/kdlab-cache." in own[0] and not os.path.exists(own[0]), job_logs
