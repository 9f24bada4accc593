"""kdlab PBS profile for Snakemake 9 + snakemake-executor-plugin-cluster-generic.

All logic of the profile's four programs lives here; the programs themselves
(pbs-submit, pbs-status, pbs-cancel, pbs-sidecar) are three-line wrappers.
Standard library only, and kept compatible with Python >= 3.6 because the
programs may run with a cluster's system python3.

Files (relative to the workflow directory, `log_dir` = logs/pbs by default):
    logs/pbs/<jobname>.<jobid>.log    everything the job prints, written live
    logs/pbs/exit/<jobid>             "<exit code> <note>", written at the job's end
    logs/pbs/start/<jobid>            "<time> <host>", written when the job starts
    logs/pbs/pbs-output/<jobname>.<stamp>.out
                                      what PBS itself delivers (qsub -j oe -o):
                                      normally only site prologue/epilogue text
                                      and PBS's own kill messages
    logs/pbs/jobs.tsv                 one line per submission (id, name, request)
    logs/pbs/status.log               why jobs failed, qstat trouble
    logs/pbs/cancel.log               qdel calls
    .snakemake/pbs/scripts/           the job scripts given to qsub
    .snakemake/pbs/vanished/          when a started job was first seen forgotten by PBS
    .snakemake/pbs/job_history.json   whether the server keeps job history, as
                                      learned in this session (rewritten by
                                      every new sidecar, i.e. every Snakemake run)
"""

import configparser
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

RUNNING, SUCCESS, FAILED = "running", "success", "failed"

# ----------------------------------------------------------------- settings

DEFAULTS = {
    "queue": "",
    "gpu_queue": "",
    "account": "",
    "extra_qsub_args": "",
    "resource_syntax": "select",
    "gpu_resource": "ngpus",
    "select_extra": "",
    "max_walltime": "",
    "job_name_max_length": "236",
    "job_shell": "/bin/bash",
    "env_setup": '. "{repo}/.venv/bin/activate"',
    "job_history": "auto",
    "qstat_json": "yes",
    "status_poll_interval": "30",
    "qstat_retries": "3",
    "qstat_retry_sleep": "2",
    "qstat_timeout": "60",
    "qsub_timeout": "120",
    "qsub_retries": "3",
    "qsub_retry_sleep": "20",
    "vanished_grace": "60",
    "log_dir": "logs/pbs",
    # names of the PBS client programs (tests and odd sites may change them)
    "qsub": "qsub",
    "qstat": "qstat",
    "qdel": "qdel",
    "qmgr": "qmgr",
}


class Settings(dict):
    def flag(self, key):
        return str(self.get(key, "")).strip().lower() in ("1", "yes", "true", "on")

    def num(self, key):
        value = str(self.get(key, "")).strip()
        try:
            return float(value)
        except ValueError:
            return float(DEFAULTS[key])

    def int(self, key):
        return int(self.num(key))


def load_settings(paths=None):
    """site.cfg of the profile, then $KDLAB_PBS_SITE (if set) over it."""
    if paths is None:
        paths = [os.path.join(HERE, "site.cfg")]
        extra = os.environ.get("KDLAB_PBS_SITE")
        if extra:
            paths.append(extra)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(paths)
    values = dict(DEFAULTS)
    if parser.has_section("pbs"):
        for key, value in parser.items("pbs"):
            values[key] = value
    return Settings(values)


# ----------------------------------------------------------------- small helpers

def now_iso():
    return time.strftime("%Y-%m-%d %H:%M:%S")


def log_dir(settings):
    return os.path.abspath(settings["log_dir"])


def state_dir():
    return os.path.abspath(os.path.join(".snakemake", "pbs"))


def append_line(path, line):
    """Append one line to a log file; never raises."""
    try:
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError:
        pass


def write_atomic(path, text):
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_cmd(argv, timeout):
    """Run a command (list argv, never a shell). Returns (rc, stdout, stderr);
    rc is None when it could not be run or timed out."""
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=timeout,
        )
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return None, "", "%s: timed out after %ss" % (argv[0], timeout)
    except OSError as e:
        return None, "", "%s: %s" % (argv[0], e)


def missing_pbs_client(settings):
    """One line when this machine lacks the PBS commands site.cfg names (no PBS client: a laptop,
    a node outside the cluster), else None; without it each job's three submissions failed with
    the cause inside Snakemake's error blocks."""
    missing = [settings.get(k, k) for k in ("qsub", "qstat") if not shutil.which(settings.get(k, k))]
    if not missing:
        return None
    return ("%s not found (PATH, or site.cfg): this machine has no PBS client, so no job can be submitted. "
            "Run on the cluster's login node, or here without the profile: snakemake --cores all"
            % " and ".join(missing))


JOBID_RE = re.compile(r"^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?$")


def valid_jobid(jobid):
    return bool(JOBID_RE.match(jobid)) and ".." not in jobid


# ================================================================= submit

NAME_BAD = re.compile(r"[^A-Za-z0-9._+-]+")


def sanitize_job_name(name, max_length=236):
    """A name qsub -N accepts: letters, digits, . _ + - only, starting with a
    letter, at most max_length characters (shortened names end in a hash so
    that different jobs keep different names)."""
    max_length = max(int(max_length), 8)
    clean = NAME_BAD.sub("-", str(name)).strip("-.")
    clean = re.sub(r"-{2,}", "-", clean)
    if not clean or not clean[0].isalpha():
        clean = "j" + clean
    if len(clean) > max_length:
        digest = hashlib.sha1(str(name).encode("utf-8")).hexdigest()[:6]
        clean = clean[: max_length - len(digest) - 1].rstrip("-.") + "." + digest
    return clean


def parse_jobscript(path):
    """The job properties (JSON after '# properties = ') and the whole text."""
    with open(path) as f:
        text = f.read()
    props = {}
    for line in text.splitlines():
        if line.startswith("# properties = "):
            props = json.loads(line[len("# properties = "):])
            break
    return props, text


def exec_lines(text):
    """The jobscript without its shebang and comment lines: the command."""
    return "\n".join(
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )


def exec_details(text):
    """Best effort: attempt and target jobs from the Snakemake command line."""
    details = {"attempt": None, "targets": []}
    try:
        tokens = shlex.split(exec_lines(text))
    except ValueError:
        return details
    for i, tok in enumerate(tokens):
        if tok == "--attempt" and i + 1 < len(tokens):
            details["attempt"] = tokens[i + 1]
        elif tok == "--target-jobs":
            for t in tokens[i + 1:]:
                if t.startswith("--"):
                    break
                details["targets"].append(t)
    return details


def job_name(props, text="", max_length=236):
    if props.get("type") == "group":
        targets = exec_details(text)["targets"] if text else []
        rules = []
        for t in targets:
            r = t.split(":", 1)[0]
            if r not in rules:
                rules.append(r)
        parts = [props.get("groupid") or "group"]
        if rules:
            parts.append("+".join(rules))
        if targets:
            parts.append("x%d" % len(targets))
        parts.append(str(props.get("jobid", ""))[:8])
        raw = ".".join(p for p in parts if p)
    else:
        parts = [props.get("rule") or "job"]
        wildcards = props.get("wildcards") or {}
        parts.extend(str(v) for v in wildcards.values())
        raw = ".".join(parts)
    return sanitize_job_name(raw, max_length)


def _number(value, default=0):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return default


def minutes_to_walltime(minutes):
    """Snakemake runtime (minutes) -> PBS walltime HH:MM:SS (hours may exceed 24)."""
    seconds = int(math.ceil(_number(minutes) * 60))
    seconds = max(seconds, 60)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "%02d:%02d:%02d" % (h, m, s)


def walltime_seconds(text):
    """'HH:MM:SS', 'MM:SS' or seconds -> seconds (None if empty/invalid)."""
    text = str(text or "").strip()
    if not text:
        return None
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return int(seconds)


def count_gpus(resources):
    """GPUs to request. `gpu` (Snakemake's standard resource; summed over the
    jobs a group runs at the same time) is the upper bound; when `gpu_share`
    (percent of one GPU a job needs, also summed in groups) is declared the
    request is ceil(gpu_share / 100), so four jobs with gpu_share=25 packed in
    one group ask for ONE GPU."""
    gpu = None
    for key in ("gpu", "gpus", "ngpus"):
        if key in resources:
            gpu = int(math.ceil(_number(resources[key])))
            break
    share = resources.get("gpu_share")
    if share is not None and _number(share) > 0:
        by_share = int(math.ceil(_number(share) / 100.0 - 1e-9))
        return by_share if gpu is None else min(gpu, by_share)
    return max(gpu or 0, 0)


def build_request(props, settings):
    """The qsub resource options (list) and a summary dict for a job."""
    resources = props.get("resources") or {}
    threads = max(int(_number(props.get("threads", 1), 1)), 1)
    mem_mb = resources.get("mem_mb")
    mem_mb = int(math.ceil(_number(mem_mb))) if mem_mb not in (None, "") else 0
    ngpus = count_gpus(resources)
    runtime = resources.get("runtime")
    walltime = None
    if runtime not in (None, "") and _number(runtime) > 0:
        walltime = minutes_to_walltime(runtime)
        limit = walltime_seconds(settings.get("max_walltime"))
        if limit and walltime_seconds(walltime) > limit:
            walltime = minutes_to_walltime(limit / 60.0)
    extra = settings.get("select_extra", "").strip()
    gpu_name = settings.get("gpu_resource", "ngpus").strip() or "ngpus"
    args = []
    if settings.get("resource_syntax", "select").strip().lower() in ("nodes", "torque"):
        spec = "nodes=1:ppn=%d" % threads
        if ngpus > 0:
            spec += ":%s=%d" % (gpu_name, ngpus)
        args += ["-l", spec + extra]
        if mem_mb > 0:
            args += ["-l", "mem=%dmb" % mem_mb]
    else:
        spec = "select=1:ncpus=%d" % threads
        if ngpus > 0:
            spec += ":%s=%d" % (gpu_name, ngpus)
        if mem_mb > 0:
            spec += ":mem=%dmb" % mem_mb
        args += ["-l", spec + extra]
    if walltime:
        args += ["-l", "walltime=" + walltime]
    summary = {"ncpus": threads, "ngpus": ngpus, "mem_mb": mem_mb, "walltime": walltime}
    return args, summary


def build_qsub_argv(props, settings, name, script, pbs_output):
    args, summary = build_request(props, settings)
    argv = [settings.get("qsub", "qsub"), "-N", name]
    queue = settings.get("queue", "").strip()
    if summary["ngpus"] > 0 and settings.get("gpu_queue", "").strip():
        queue = settings["gpu_queue"].strip()
    if queue:
        argv += ["-q", queue]
    account = settings.get("account", "").strip()
    if account:
        argv += ["-A", account]
    argv += args
    argv += ["-j", "oe", "-o", pbs_output]
    shell = settings.get("job_shell", "").strip()
    if shell:
        argv += ["-S", shell]
    extra = settings.get("extra_qsub_args", "").strip()
    if extra:
        argv += shlex.split(extra)
    argv.append(script)
    return argv, summary


JOB_TEMPLATE = r"""#!/bin/bash
# kdlab PBS job script, written by profiles/pbs/pbs-submit at @STAMP@.
# job name: @NAME@
@PROPS@
KDLAB_PBS_WORKDIR=@Q_WORKDIR@
KDLAB_PBS_NAME=@Q_NAME@
KDLAB_PBS_LOGDIR=@Q_LOGDIR@
cd "$KDLAB_PBS_WORKDIR" || { echo "pbs-job: cannot cd to $KDLAB_PBS_WORKDIR" >&2; exit 1; }
_kd_id="${PBS_JOBID:-nojobid-$$}"
mkdir -p "$KDLAB_PBS_LOGDIR/exit" "$KDLAB_PBS_LOGDIR/start"
# Start marker: lets pbs-status tell a job that never started (deleted while
# queued) from one that finished while PBS keeps no history, without waiting.
_kd_startfile="$KDLAB_PBS_LOGDIR/start/$_kd_id"
printf '%s %s\n' "$(date '+%F %T')" "$(hostname)" > "$_kd_startfile.tmp.$$" && mv -f "$_kd_startfile.tmp.$$" "$_kd_startfile"
# Everything from here on goes to logs/pbs/<jobname>.<jobid>.log, live.
exec >>"$KDLAB_PBS_LOGDIR/$KDLAB_PBS_NAME.$_kd_id.log" 2>&1
_kd_exitfile="$KDLAB_PBS_LOGDIR/exit/$_kd_id"
_kd_child=""
_kd_own_cache=""
_kd_finish() {  # record the exit code for pbs-status (PBS may forget the job)
    if [ -n "$_kd_own_cache" ]; then rm -rf "$_kd_own_cache"; fi
    printf '%s %s\n' "$1" "$2" > "$_kd_exitfile.tmp.$$" && mv -f "$_kd_exitfile.tmp.$$" "$_kd_exitfile"
    echo "[pbs-job] $(date '+%F %T') end of job $_kd_id: exit code $1 $2"
}
_kd_on_signal() {  # PBS sends SIGTERM on walltime/memory kills and qdel, SIGKILL later
    echo "[pbs-job] $(date '+%F %T') received SIG$1 (walltime or memory limit, or qdel); stopping"
    trap - TERM INT HUP
    if [ -n "$_kd_child" ]; then kill -"$1" "$_kd_child" 2>/dev/null; wait "$_kd_child"; fi
    _kd_finish $((256 + $2)) "SIG$1"
    exit $((128 + $2))
}
trap '_kd_on_signal TERM 15' TERM
trap '_kd_on_signal INT 2' INT
trap '_kd_on_signal HUP 1' HUP
echo "[pbs-job] $(date '+%F %T') start of job $_kd_id ($KDLAB_PBS_NAME) on $(hostname) in $PWD"
echo "[pbs-job] request: @REQUEST@; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
# PBS assigns GPU devices only through its cgroups hook; without it every job on
# a node sees all GPUs and trains on the first, whichever job PBS gave it to.
if [ @NGPUS@ -gt 0 ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo "[pbs-job] WARNING: PBS set no CUDA_VISIBLE_DEVICES: this job uses GPU 0 of the node, which may be another job's (docs/pbs.md, What to ask the admins)"
fi
# The inner Snakemake gets the cores PBS gave the job (NCPUS: OpenPBS / PBS Pro,
# PBS_NUM_PPN: Torque), not all cores of the node.
_kd_cores="${NCPUS:-${PBS_NUM_PPN:-all}}"
echo "[pbs-job] cores for the Snakemake job: $_kd_cores"
# ---- environment (site.cfg: env_setup) ----
_kd_env_setup() {
:
@ENV_SETUP@
}
_kd_env_setup || echo "[pbs-job] WARNING: env_setup from profiles/pbs/site.cfg failed"
# Snakemake creates ~/.cache/snakemake when it starts: where $HOME is read-only, full or not
# mounted on the compute nodes, every job would fail there. Then this job has a cache of its own.
_kd_cache="${XDG_CACHE_HOME:-$HOME/.cache}"
if ! mkdir -p "$_kd_cache/snakemake" 2>/dev/null || [ ! -w "$_kd_cache/snakemake" ]; then
    _kd_own_cache="$(mktemp -d "${TMPDIR:-/tmp}/kdlab-cache.XXXXXX")" && export XDG_CACHE_HOME="$_kd_own_cache"
    echo "[pbs-job] $_kd_cache/snakemake cannot be written here: XDG_CACHE_HOME=${_kd_own_cache:-unset} for this job"
fi
echo "[pbs-job] python on PATH: $(command -v python || echo none)"
# ---- the Snakemake job ----
(
@EXEC@
) &
_kd_child=$!
wait "$_kd_child"
_kd_rc=$?
_kd_finish "$_kd_rc" ""
exit "$_kd_rc"
"""


CORES_ALL = re.compile(r"--cores[= ]'?all'?(?=\s|$)")


def make_job_script(props, text, name, workdir, logdir, settings, summary, stamp):
    env_setup = settings.get("env_setup", "")
    env_setup = env_setup.replace("{repo}", REPO).replace("{workdir}", workdir)
    request = ", ".join("%s=%s" % (k, v) for k, v in sorted(summary.items()))
    props_line = "# properties = " + json.dumps(props)
    script = JOB_TEMPLATE
    for key, value in (
        ("@STAMP@", stamp),
        ("@NAME@", name),
        ("@Q_WORKDIR@", shlex.quote(workdir)),
        ("@Q_NAME@", shlex.quote(name)),
        ("@Q_LOGDIR@", shlex.quote(logdir)),
        ("@REQUEST@", re.sub(r"[^A-Za-z0-9_.:=, -]", "", request)),
        ("@NGPUS@", str(int(summary["ngpus"]))),
        ("@ENV_SETUP@", env_setup),
        ("@PROPS@", props_line.replace("\n", " ")),
        ("@EXEC@", CORES_ALL.sub('--cores "$_kd_cores"', exec_lines(text))),
    ):
        script = script.replace(key, value)
    return script


def sidecar_info():
    raw = os.environ.get("SNAKEMAKE_CLUSTER_SIDECAR_VARS")
    if not raw:
        return None
    try:
        info = json.loads(raw)
        return info if isinstance(info, dict) else None
    except ValueError:
        return None


def register_job(jobid):
    """Tell the sidecar to watch this job (one empty file per job)."""
    info = sidecar_info()
    if not info or not info.get("active"):
        return
    try:
        path = os.path.join(info["active"], jobid)
        if not os.path.exists(path):
            with open(path, "w"):
                pass
    except OSError:
        pass


class QstatUnanswered(Exception):
    pass


def earlier_jobs(settings, ledger, name, outputs):
    """The PBS jobs submitted from this workflow directory earlier (logs/pbs/jobs.tsv) for any of
    `outputs` that are still queued, running or held: {jobid: the outputs it was submitted for}.
    Every such job, not only the last: a restart's job that waited for an earlier one and was
    deleted must not hide it. Keyed on outputs, not on the job's name: a pack
    (--groups) restarted with another composition, or a job of one pack whose other members have
    finished, has another name. A line of an older ledger, without the outputs column, is this
    job's if it has its name and first output (or, older still, its name). QstatUnanswered when
    qstat does not answer about one that has not written its exit code."""
    covers, wanted = {}, set(outputs)  # covers: jobid -> the outputs it was submitted for, if it makes some wanted
    try:
        with open(ledger) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3 or not valid_jobid(parts[1]):
                    continue
                try:
                    listed = set(json.loads(parts[12])) if len(parts) > 12 else None
                except (TypeError, ValueError):  # not a list of names: a line damaged by hand
                    listed = None
                if listed is None:  # the same name (and first output): the same job
                    if parts[2] != name or (len(parts) > 11 and parts[11] != min(outputs)):
                        continue
                    listed = wanted
                if listed & wanted:
                    covers[parts[1]] = listed
    except OSError:
        return {}
    # One that wrote its exit code has ended (a retry after a walltime kill, a restart after it
    # finished): no qstat, which a restart would otherwise call once per job, up to 10 a second.
    candidates = sorted(j for j in covers if read_exit_file(settings, j) is None)
    if not candidates:
        return {}
    error = None
    for attempt in range(max(settings.int("qstat_retries"), 1)):
        found, unknown, error = query_jobs(settings, candidates)
        if error is None:
            return {j: covers[j] for j, entry in found.items()
                    if j in covers and str(entry.get("job_state", "")).strip().upper()[:1] in ACTIVE_STATES}
        time.sleep(settings.num("qstat_retry_sleep"))
    raise QstatUnanswered("%s (%s)" % (" ".join(candidates), _one_line(error)))


# qsub messages of a server that was not reached (restart, fail-over, network):
# no job was created. Not a timeout nor a "communication failure": the server may
# have made the job and lost the reply, and a second one would share its checkpoint.
QSUB_UNREACHED = re.compile(r"cannot connect to (the )?server|connection refused|pbs_iff: cannot", re.IGNORECASE)


def submit_main(argv):
    show_only = False
    args = list(argv)
    if args and args[0] in ("--show-request", "-n", "--dry-run"):
        show_only = True
        args = args[1:]
    if not args:
        sys.stderr.write("usage: pbs-submit [--show-request] <snakemake jobscript>\n")
        return 2
    jobscript = args[-1]
    settings = load_settings()
    props, text = parse_jobscript(jobscript)
    name = job_name(props, text, settings.int("job_name_max_length"))
    workdir = os.getcwd()
    logdir = log_dir(settings)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    uniq = "%s.%d" % (stamp, os.getpid())
    pbs_output = os.path.join(logdir, "pbs-output", "%s.%s.out" % (name, uniq))
    script_path = os.path.join(state_dir(), "scripts", "%s.%s.sh" % (name, uniq))
    qsub_argv, summary = build_qsub_argv(props, settings, name, script_path, pbs_output)
    if show_only:
        print(" ".join(shlex.quote(a) for a in qsub_argv))
        return 0
    no_client = missing_pbs_client(settings)
    if no_client:
        sys.stderr.write("pbs-submit: %s\n" % no_client)
        return 1
    if props.get("type") == "group" and summary["ngpus"] > 1:
        sys.stderr.write(
            "pbs-submit: group job %s asks for %d GPUs (gpu_share summed); the runs "
            "all use the first visible GPU unless they pick one themselves\n"
            % (name, summary["ngpus"])
        )
    ledger = os.path.join(logdir, "jobs.tsv")
    # A group lists its outputs in any order; Snakemake lists none past 100 (a large pack): its name stands for them
    outputs = sorted(props.get("output") or ["(outputs not listed) " + name])
    output = outputs[0]
    try:
        earlier = earlier_jobs(settings, ledger, name, outputs)
    except QstatUnanswered as e:
        # A second job would meet the first one's run lock and fail, and Snakemake would then
        # remove the outputs that the first one wrote.
        sys.stderr.write("pbs-submit: qstat does not answer whether an earlier job for %s is still queued or "
                         "running: %s; not submitting a second one. Run again once qstat answers, or qdel "
                         "it first.\n" % (name, e))
        status_log(settings, "%s: not submitted: qstat does not answer about the earlier job(s) %s" % (name, e))
        return 1
    previous = next((j for j, covered in sorted(earlier.items()) if covered >= set(outputs)), None)
    if previous:
        # Snakemake was restarted while a PBS job of the earlier run that makes all of this
        # job's outputs is still queued or running (Snakemake forgets it once the job has
        # started). A second job would train on the same checkpoint: watch the old one.
        sys.stdout.write(previous + "\n")
        sys.stdout.flush()
        register_job(previous)
        sys.stderr.write(
            "pbs-submit: %s is still queued/running in PBS as %s (from an earlier "
            "Snakemake run); watching it instead of submitting it again. To start "
            "it over, qdel %s first.\n" % (name, previous, previous)
        )
        status_log(settings, "%s: re-attached to PBS job %s of an earlier run" % (name, previous))
        return 0
    if earlier:  # they make some of its outputs: start only after they have ended
        after = sorted(earlier)
        qsub_argv[1:1] = ["-W", "depend=afterany:" + ":".join(after)]
        said = "submitted to start after %s of an earlier run, which make(s) some of its outputs" % " ".join(after)
        sys.stderr.write("pbs-submit: %s %s\n" % (name, said))
        status_log(settings, "%s: %s" % (name, said))
    script = make_job_script(props, text, name, workdir, logdir, settings, summary, now_iso())
    write_atomic(script_path, script)
    os.chmod(script_path, 0o755)
    os.makedirs(os.path.join(logdir, "pbs-output"), exist_ok=True)
    os.makedirs(os.path.join(logdir, "exit"), exist_ok=True)
    submitted = time.time()
    tries = max(settings.int("qsub_retries"), 1)
    for attempt in range(tries):
        rc, out, err = run_cmd(qsub_argv, settings.num("qsub_timeout"))
        if rc in (0, None) or attempt + 1 == tries or not QSUB_UNREACHED.search(out + err):
            break
        # the server was not reached, so no job exists: asking again is safe (a
        # failed submission is a failed attempt to Snakemake: twice the walltime)
        status_log(settings, "qsub for %s could not reach the server (exit %s: %s); trying again"
                   % (name, rc, _one_line(err or out)))
        time.sleep(settings.num("qsub_retry_sleep"))
    # the job id: the first line that looks like one (some sites' qsub wrappers
    # print a banner), else the first non-empty line
    lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
    ids = [line for line in lines if valid_jobid(line)]
    jobid = ids[0] if ids else (lines[0] if lines else "")
    if rc != 0 or not jobid:
        sys.stderr.write(
            "pbs-submit: qsub failed (exit %s) for %s:\n%s%s\ncommand: %s\n"
            % (rc, name, out or "", err or "", " ".join(shlex.quote(a) for a in qsub_argv))
        )
        status_log(settings, "qsub failed (exit %s) for %s: %s" % (rc, name, (err or out or "").strip()))
        return 1
    sys.stdout.write(jobid + "\n")
    sys.stdout.flush()
    register_job(jobid)
    remove_stale_job_files(settings, jobid, submitted - 600)
    details = exec_details(text)
    if props.get("type") == "group":
        what = "group " + str(props.get("groupid"))
        wildcards = " ".join(details["targets"])
    else:
        what = str(props.get("rule"))
        wildcards = ",".join(
            "%s=%s" % (k, v) for k, v in (props.get("wildcards") or {}).items()
        )
    if not os.path.exists(ledger):
        append_line(ledger, "submitted\tjobid\tname\trule\tattempt\tncpus\tngpus\tmem_mb\twalltime\twildcards\tlog"
                            "\toutput\toutputs")
    append_line(
        ledger,
        "\t".join(
            str(x)
            for x in (
                now_iso(), jobid, name, what, details["attempt"] or "",
                summary["ncpus"], summary["ngpus"], summary["mem_mb"], summary["walltime"] or "",
                wildcards, os.path.join(settings["log_dir"], "%s.%s.log" % (name, jobid)), output,
                json.dumps(outputs),
            )
        ),
    )
    return 0


# ================================================================= qstat parsing

FINAL_STATES = {"F", "C", "X"}
ACTIVE_STATES = {"Q", "R", "E", "H", "W", "T", "S", "U", "B", "M"}


def _norm_entry(attrs):
    """Keep what status needs, with case-insensitive keys (Torque: exit_status)."""
    low = {}
    for k, v in attrs.items():
        low[str(k).lower()] = v
    entry = {}
    for key in ("job_state", "substate", "exit_status", "comment", "run_count", "job_name"):
        if key in low:
            entry[key] = low[key]
    return entry


def parse_qstat_json(text):
    """`qstat -f -F json` output -> {jobid: entry}. Raises ValueError when the
    text is not the expected JSON (some PBS versions emit invalid JSON)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("qstat JSON is not an object")
    jobs = data.get("Jobs", {})
    if not isinstance(jobs, dict):
        raise ValueError("qstat JSON 'Jobs' is not an object")
    return {str(k): _norm_entry(v) for k, v in jobs.items() if isinstance(v, dict)}


def parse_qstat_text(text):
    """Plain `qstat -f` output -> {jobid: entry}. Raises ValueError if no job
    block is found in non-empty output (garbage)."""
    jobs = {}
    current = None
    attrs = None
    last_key = None
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        m = re.match(r"^Job Id:\s*(\S+)", line)
        if m:
            current = m.group(1)
            attrs = {}
            jobs[current] = attrs
            last_key = None
            continue
        if attrs is None:
            continue
        if line.startswith("\t") and last_key is not None:
            # continuation of a long value
            attrs[last_key] = str(attrs[last_key]) + line.strip()
            continue
        m = re.match(r"^\s+([A-Za-z_][A-Za-z0-9_.]*)\s*=\s?(.*)$", line)
        if m:
            last_key = m.group(1)
            attrs[last_key] = m.group(2).strip()
    if not jobs and text.strip():
        raise ValueError("no 'Job Id:' block in qstat output")
    return {k: _norm_entry(v) for k, v in jobs.items()}


def find_job(jobs, jobid):
    """Entry of jobid in parsed qstat output; tolerates a server suffix that
    differs (1234.server vs 1234.server.domain)."""
    if jobid in jobs:
        return jobs[jobid]
    head = jobid.split(".", 1)[0]
    for k, v in jobs.items():
        if k.split(".", 1)[0] == head and (k.startswith(jobid) or jobid.startswith(k)):
            return v
    return None


EXIT_REASONS = {
    -1: "PBS could not start the job (JOB_EXEC_FAIL1)",
    -2: "PBS could not start the job (JOB_EXEC_FAIL2)",
    -3: "PBS could not start the job; it may be retried (JOB_EXEC_RETRY)",
    -4: "job aborted on MoM initialisation",
    -10: "invalid user/group on the execution host",
    -11: "job was rerun/requeued (JOB_EXEC_RERUN)",
    -20: "job rerun after a sister MoM failure",
    -24: "killed: ncpus sum exceeded",
    -25: "killed: ncpus burst exceeded",
    -26: "killed: virtual memory limit exceeded",
    -27: "killed: memory limit exceeded (raise mem_mb)",
    -28: "killed: cpu time limit exceeded",
    -29: "killed: walltime exceeded (the retry asks for a longer walltime)",
}

SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}


def describe_exit(code, comment="", label="Exit_status"):
    """Human-readable reason for a PBS Exit_status (or a job's exit code)."""
    code = int(code)
    if code == 0:
        return "exit status 0"
    if code < 0:
        reason = EXIT_REASONS.get(code, "PBS-internal failure")
        return "%s %d: %s" % (label, code, reason)
    if code > 128:
        # Above 256: PBS killed the job shell with signal code - 256. From 129 to 256: the
        # job script trapped signal code - 128 and exited with this code itself, which is
        # what PBS records for a qdel (and a walltime kill before OpenPBS 22.05).
        killed = code > 256
        sig = code - (256 if killed else 128)
        hint = ""
        if "walltime" in (comment or ""):
            hint = " (walltime exceeded)"
        elif sig in (9, 15):
            hint = " (walltime/memory limit or qdel)"
        return "%s %d: job %s %s%s" % (label, code, "shell killed by" if killed else "exited after",
                                       SIGNAL_NAMES.get(sig, "signal %d" % sig), hint)
    return "%s %d: the job (Snakemake) failed; see the rule's log" % (label, code)


def classify(entry, exit_file=None):
    """(status, reason) from one qstat entry; exit_file is (code, note) or None."""
    entry = _norm_entry(entry)
    state = str(entry.get("job_state", "")).strip().upper()[:1]
    comment = str(entry.get("comment", "") or "")
    if state in ACTIVE_STATES:
        return RUNNING, "job_state %s" % state
    if state in FINAL_STATES:
        status = entry.get("exit_status")
        if status is not None and str(status).strip() != "":
            try:
                code = int(float(str(status).strip()))
            except ValueError:
                code = None
            if code is not None:
                if code == 0:
                    return SUCCESS, "exit status 0"
                return FAILED, describe_exit(code, comment)
        if exit_file is not None:
            code = exit_file[0]
            return (SUCCESS if code == 0 else FAILED), "exit-code file: " + describe_exit(
                code, exit_file[1], "exit code")
        substate = str(entry.get("substate", "")).strip()
        if substate == "91":
            return FAILED, "job was deleted (qdel) before it finished"
        return FAILED, "job finished without an Exit_status (%s)" % comment
    return None, "unknown job_state %r" % state


def _job_file(directory, jobid):
    """Path of directory/<jobid>, or None. Tolerates a job id whose server part
    differs from $PBS_JOBID's (1234.server vs 1234.server.domain)."""
    path = os.path.join(directory, jobid)
    if os.path.exists(path):
        return path
    head = jobid.split(".", 1)[0] + "."
    try:
        names = [n for n in os.listdir(directory) if n.startswith(head) and ".tmp." not in n
                 and (n.startswith(jobid) or jobid.startswith(n))]
    except OSError:
        names = []
    return os.path.join(directory, names[0]) if names else None


def read_exit_file(settings, jobid):
    """(exit code, note) from logs/pbs/exit/<jobid>, or None."""
    path = _job_file(os.path.join(log_dir(settings), "exit"), jobid)
    if path is None:
        return None
    try:
        with open(path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first:
        return None
    try:
        code = int(first[0])
    except ValueError:
        return None
    return code, " ".join(first[1:])


def remove_stale_job_files(settings, jobid, before):
    """Remove the exit-code file, start marker and vanished marker of an earlier
    job that had the same id (PBS reuses ids after max_job_sequence_id wraps
    or a server reinstall): they would decide the new job's fate. Files newer
    than `before` are the new job's own."""
    for directory in (os.path.join(log_dir(settings), "exit"), os.path.join(log_dir(settings), "start"),
                      os.path.join(state_dir(), "vanished")):
        path = _job_file(directory, jobid)
        try:
            if path is not None and os.path.getmtime(path) < before:
                os.remove(path)
                status_log(settings, "job %s: removed %s, left by an earlier job with the same id"
                           % (jobid, path))
        except OSError:
            pass


def job_started(settings, jobid):
    """Whether the job wrote its start marker (logs/pbs/start/<jobid>)."""
    return _job_file(os.path.join(log_dir(settings), "start"), jobid) is not None


# ================================================================= job history

# What OpenPBS's `qstat -x` says (exit 0, no job listed) when the server keeps
# no job history.
NO_HISTORY = "not configured to maintain job history"
UNKNOWN_WORDS = ("unknown job id", "job has finished")


def history_path():
    return os.path.join(state_dir(), "job_history.json")


def _one_line(text):
    return " | ".join((text or "").strip().splitlines())[:300]


def forced_history(settings):
    """site.cfg's job_history: True / False when it forces it, None for auto."""
    value = settings.get("job_history", "auto").strip().lower()
    return {"yes": True, "true": True, "on": True, "1": True,
            "no": False, "false": False, "off": False, "0": False}.get(value)


def known_history(settings):
    """Whether the server keeps job history: True / False when site.cfg forces
    it or this session has learned it, None while unknown (qstat is then
    called with -x, and its answer tells). A forced `yes` gives way to a
    server that refused `qstat -x` in this session."""
    forced = forced_history(settings)
    if forced is False:
        return False
    try:
        with open(history_path()) as f:
            learned = json.load(f).get("history")
    except (OSError, ValueError, AttributeError):
        return True if forced else probe_history(settings)
    return False if learned is False else (forced or learned)


def probe_history(settings):
    """Ask the server (`qmgr -c 'list server job_history_enable'`, which most
    sites allow every user); remember the answer, or that qmgr did not tell."""
    rc, out, err = run_cmd([settings.get("qmgr", "qmgr"), "-c", "list server job_history_enable"],
                           min(settings.num("qstat_timeout"), 10))
    history = None
    if rc == 0 and out.lstrip().startswith("Server"):
        m = re.search(r"job_history_enable\s*=\s*(\S+)", out)
        history = bool(m) and m.group(1).lower() in ("true", "t", "1", "y", "yes")
        why = "qmgr: job_history_enable = %s" % (m.group(1) if m else "unset")
    else:
        why = "qmgr did not tell (exit %s: %s); the first qstat -x answer will" % (
            rc, _one_line(err or out))
    remember_history(settings, history, why)
    return history


def learn_history(settings, history, why):
    """Record what a qstat answer revealed (nothing to learn when forced,
    except that a server refuses the `qstat -x` of job_history = yes)."""
    forced = forced_history(settings)
    if forced is False or (forced is True and history is not False):
        return
    if forced is True:
        why += "; job_history = yes in site.cfg is wrong for this server"
    try:
        with open(history_path()) as f:
            if json.load(f).get("history") == history:
                return
    except (OSError, ValueError, AttributeError):
        pass
    remember_history(settings, history, why)


def remember_history(settings, history, why):
    write_atomic(history_path(), json.dumps({"history": history, "why": why, "time": now_iso()}))
    meaning = {
        True: "on: finished jobs are judged by their Exit_status (qstat -x)",
        False: "off: finished jobs are judged by their exit-code files (qstat without -x)",
        None: "not known yet: qstat is called with -x",
    }[history]
    status_log(settings, "job history %s [%s]" % (meaning, why))


# ================================================================= qstat

def qstat_argv(settings, jobids, json_format, history):
    argv = [settings.get("qstat", "qstat")]
    if history is not False:
        argv.append("-x")
    argv.append("-f")
    if json_format:
        argv += ["-F", "json"]
    return argv + list(jobids)


UNKNOWN_RCS = (153, 35)


class HistoryRefused(Exception):
    """OpenPBS without job history rejects a `qstat -x` request as a whole
    (PBSE_JOBHISTNOTSET, exit 0), for queued and running jobs too: its answer
    says nothing about the jobs."""


def _run_qstat(settings, jobids, json_format, history):
    """-> (rc, jobs or None, stderr, error). jobs None with error None means
    the output could not be parsed (caller may fall back to plain text)."""
    rc, out, err = run_cmd(qstat_argv(settings, jobids, json_format, history),
                           settings.num("qstat_timeout"))
    if rc is None:
        return rc, None, err, err
    if NO_HISTORY in (err or "").lower():
        learn_history(settings, False, "qstat -x: " + _one_line(err))
        if history is not False:
            raise HistoryRefused(_one_line(err))
    if out.strip():
        try:
            parse = parse_qstat_json if json_format else parse_qstat_text
            return rc, parse(out), err, None
        except ValueError as e:
            what = "invalid JSON from qstat -F json" if json_format else "unreadable qstat output"
            return rc, None, err, "%s (%s)" % (what, e)
    if rc == 0 or rc in UNKNOWN_RCS:
        return rc, {}, err, None
    return rc, None, err, "qstat exit %s: %s" % (rc, _one_line(err))


def _mentioned(text, jobid):
    for line in (text or "").splitlines():
        tokens = [t.strip(",;:'\"") for t in line.split()]
        if jobid in tokens:
            return True
    return False


def _query(settings, jobids, history):
    jobs = None
    error = None
    if settings.flag("qstat_json"):
        rc, jobs, err, error = _run_qstat(settings, jobids, True, history)
        if rc is None:
            return {}, [], error
    if jobs is None:
        json_error = error
        rc, jobs, err, error = _run_qstat(settings, jobids, False, history)
        if jobs is None:
            if json_error:
                error = "%s; then %s" % (json_error, error)
            return {}, [], error
    found = {}
    missing = []
    for jobid in jobids:
        entry = find_job(jobs, jobid)
        if entry is not None:
            found[jobid] = entry
        else:
            missing.append(jobid)
    if history is None and any(str(e.get("job_state", "")).upper()[:1] == "F" for e in found.values()):
        learn_history(settings, True, "qstat -x lists finished jobs")
    # A job the server answered for without listing it is unknown to it: it
    # finished and was forgotten (no history), or never existed there.
    says_unknown = rc == 0 or rc in UNKNOWN_RCS or any(w in (err or "").lower() for w in UNKNOWN_WORDS)
    if len(jobids) == 1:
        unknown = list(missing) if says_unknown else []
    else:
        unknown = [j for j in missing if _mentioned(err, j)]
    return found, unknown, None


def query_jobs(settings, jobids):
    """One qstat call (JSON, falling back to plain text) for several jobs.
    Returns (jobs, unknown_ids, error): jobs {id: entry} for the ids found,
    unknown_ids those the server does not know (any more), error a message
    when the call failed (nothing usable)."""
    history = known_history(settings)
    try:
        found, unknown, error = _query(settings, jobids, history)
    except HistoryRefused:
        return _query(settings, jobids, False)
    if error is not None and history is None:
        # Torque's `qstat -x` means XML: if the -x call gives nothing usable but
        # the plain one works, there is no history we can read.
        found2, unknown2, error2 = _query(settings, jobids, False)
        if error2 is None:
            learn_history(settings, False, "qstat -x gave no usable answer (%s)" % error[:200])
            return found2, unknown2, None
    return found, unknown, error


# ================================================================= status

RAN_STATES = {"R", "E", "S", "U"}


def status_log(settings, message):
    append_line(os.path.join(log_dir(settings), "status.log"), "%s %s" % (now_iso(), message))


def judge_entry(settings, jobid, entry):
    """(status, reason) of a job qstat lists; status None when unreadable."""
    status, reason = classify(entry, None)
    if status == FAILED and reason.startswith("job finished without"):
        exit_file = read_exit_file(settings, jobid)
        if exit_file is not None:
            status, reason = classify(entry, exit_file)
    return status, reason


def resolve_vanished(settings, jobid, seen_running=False):
    """A job qstat does not list (finished while the server keeps no history,
    deleted while queued, or from an earlier run). Decided at once from its
    exit-code file, or, when it never started, as failed; only a job that
    started but left no exit-code file waits `vanished_grace` seconds."""
    why = "not listed by qstat"
    exit_file = read_exit_file(settings, jobid)
    marker = os.path.join(state_dir(), "vanished", jobid)
    if exit_file is not None:
        try:
            os.remove(marker)
        except OSError:
            pass
        code = exit_file[0]
        if code == 0:
            return SUCCESS, "%s; exit-code file says 0" % why
        return FAILED, "%s; exit-code file: %s" % (why, describe_exit(code, exit_file[1], "exit code"))
    if not (seen_running or job_started(settings, jobid)):
        return FAILED, (
            "%s, no start marker and no exit-code file: it never started (deleted while "
            "queued, or a job of an earlier run that PBS has forgotten)" % why)
    grace = settings.num("vanished_grace")
    try:
        if not os.path.exists(marker):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                f.write(now_iso() + "\n")
            status_log(settings, "job %s: %s; it started but has no exit-code file yet; waiting "
                       "up to %gs (vanished_grace) before reporting it failed" % (jobid, why, grace))
            return RUNNING, "started, forgotten by PBS, waiting for the exit-code file"
        age = time.time() - os.path.getmtime(marker)
    except OSError:
        age = 0
    if age > grace:
        return FAILED, (
            "%s; it started but wrote no exit-code file within %gs: killed hard (SIGKILL, "
            "node failure)" % (why, grace))
    return RUNNING, "started, forgotten by PBS, waiting for the exit-code file"


def status_direct(settings, jobid):
    """Ask qstat about one job (retrying transient failures)."""
    retries = max(settings.int("qstat_retries"), 1)
    error = None
    for attempt in range(retries):
        found, unknown, error = query_jobs(settings, [jobid])
        if error is None:
            if jobid in found:
                status, reason = judge_entry(settings, jobid, found[jobid])
                if status is not None:
                    return status, reason
                error = reason
            elif jobid in unknown:
                return resolve_vanished(settings, jobid)
            else:
                error = "qstat did not mention the job"
        if attempt + 1 < retries:
            time.sleep(settings.num("qstat_retry_sleep"))
    status_log(settings, "job %s: qstat failed %d times (%s); reporting running" % (jobid, retries, error))
    return RUNNING, "qstat failing: %s" % error


def status_from_sidecar(settings, jobid):
    """Answer from the sidecar's cache when it is fresh; None when we must ask
    qstat ourselves."""
    info = sidecar_info()
    if not info or not info.get("cache"):
        return None
    try:
        with open(info["cache"]) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return None
    interval = float(info.get("interval", settings.num("status_poll_interval")))
    now = time.time()
    age = now - float(cache.get("attempted", 0))
    # A live sidecar may be slow: a poll waits out qstat_timeout for up to four
    # calls when the server hangs. Asking qstat for every job then would only
    # pile up calls on that server and block Snakemake's status rounds.
    if age > 3 * interval + 10 and not (
            _alive(info.get("pid")) and age < 3 * interval + 10 + 4 * settings.num("qstat_timeout")):
        return None  # sidecar dead or stuck: ask qstat directly
    entry = cache.get("jobs", {}).get(jobid)
    if entry is not None:
        if entry.get("unknown"):
            return resolve_vanished(settings, jobid, entry.get("was") in RAN_STATES)
        status, reason = judge_entry(settings, jobid, entry)
        if status is None:
            return None
        return status, reason
    active = info.get("active")
    registered = active and os.path.exists(os.path.join(active, jobid))
    if cache.get("error") and float(cache.get("error_time", 0)) >= float(cache.get("updated", 0)):
        # the sidecar's last qstat failed; it retries on its own schedule
        if not registered and active:
            register_job(jobid)
        return RUNNING, "sidecar: qstat failing (%s)" % cache.get("error")
    if registered:
        try:
            reg_time = os.path.getmtime(os.path.join(active, jobid))
        except OSError:
            reg_time = now
        if reg_time >= float(cache.get("poll_started", 0)) - 1:
            return RUNNING, "submitted after the sidecar's last qstat"
        return None
    # a job the sidecar does not know (e.g. resumed by Snakemake after a restart)
    register_job(jobid)
    return None


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True
    except (OSError, TypeError, ValueError):
        return False
    return True


def status_main(argv):
    """Print exactly one of running/success/failed; always exit 0."""
    result = RUNNING
    settings = None
    try:
        settings = load_settings()
        if not argv:
            sys.stderr.write("usage: pbs-status <jobid>\n")
        else:
            jobid = argv[0].strip()
            if not valid_jobid(jobid):
                status_log(settings, "job %r: not a PBS job id; reporting failed" % jobid)
                result, reason = FAILED, "invalid job id"
            else:
                answer = status_from_sidecar(settings, jobid)
                if answer is None:
                    answer = status_direct(settings, jobid)
                result, reason = answer
                if result == SUCCESS:
                    status_log(settings, "job %s succeeded: %s" % (jobid, reason))
                elif result == FAILED:
                    message = "job %s failed: %s" % (jobid, reason)
                    status_log(settings, message)
                    sys.stderr.write("pbs-status: %s (details: %s/status.log)\n" % (message, settings["log_dir"]))
    except Exception as e:  # never let a bug stop the workflow
        try:
            if settings is not None:
                status_log(settings, "pbs-status internal error: %r; reporting running" % (e,))
        except Exception:
            pass
        result = RUNNING
    sys.stdout.write(result + "\n")
    sys.stdout.flush()
    return 0


# ================================================================= sidecar

def sidecar_main(argv):
    """Long-running helper started by cluster-generic: polls qstat for all jobs
    of this workflow in one call every `status_poll_interval` seconds and
    keeps the answers in a cache file that pbs-status reads."""
    settings = load_settings()
    no_client = missing_pbs_client(settings)
    if no_client:  # said once, before the first job's submission fails with it
        sys.stderr.write("kdlab PBS profile: %s (Ctrl-C stops Snakemake)\n" % no_client)
    interval = max(settings.num("status_poll_interval"), 0.2)
    parent = os.getppid()
    for stale in glob.glob(os.path.join(state_dir(), "sidecar.*")):  # of a sidecar killed with -9: a new one
        if not _alive(stale.rsplit(".", 1)[1]):                     # with its pid would qdel its jobs on Ctrl-C
            _rmtree(stale)
    base = os.path.join(state_dir(), "sidecar.%d" % os.getpid())
    active = os.path.join(base, "active")
    cache_path = os.path.join(base, "cache.json")
    os.makedirs(active, exist_ok=True)
    cache = {"jobs": {}, "updated": 0, "attempted": time.time(), "poll_started": 0,
             "error": None, "error_time": 0}
    write_atomic(cache_path, json.dumps(cache))
    sys.stdout.write(json.dumps({"cache": cache_path, "active": active, "interval": interval,
                                 "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    # a new session: learn afresh whether the server keeps job history
    try:
        os.remove(history_path())
    except OSError:
        pass
    known_history(settings)
    logfile = os.path.join(log_dir(settings), "status.log")

    stopping = []
    interrupted = []

    def stop(signum, frame):
        stopping.append(signum)

    def interrupt(signum, frame):
        # Ctrl-C in the terminal reaches the whole process group, us included.
        # Snakemake cancels its jobs and then terminates us; but jobs it was
        # checking at that moment are missing from its list (a race in the
        # executor), so we qdel whatever is still registered when we stop.
        interrupted.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGHUP, stop)
    try:
        while not stopping:
            if os.getppid() != parent:
                break  # Snakemake is gone
            poll_once(settings, active, cache, logfile)
            write_atomic(cache_path, json.dumps(cache))
            deadline = time.time() + interval
            while not stopping and time.time() < deadline:
                time.sleep(min(0.2, interval))
    finally:
        if interrupted or os.path.exists(os.path.join(base, "cancel")):
            cancel_registered(settings, base)
        _rmtree(base)
    return 0


def poll_once(settings, active, cache, logfile):
    """One qstat (per 100 jobs) for every registered job; updates cache."""
    try:
        ids = sorted(os.listdir(active))
    except OSError:
        ids = []
    ids = [j for j in ids if valid_jobid(j)]
    started = time.time()
    cache["poll_started"] = started
    if ids:
        errors = []
        for i in range(0, len(ids), 100):
            chunk = ids[i:i + 100]
            found, unknown, error = query_jobs(settings, chunk)
            if error is not None:
                errors.append(error)
                continue
            # some PBS versions answer only for the first of several ids
            for jobid in chunk:
                if jobid not in found and jobid not in unknown and len(chunk) > 1:
                    f1, u1, e1 = query_jobs(settings, [jobid])
                    found.update(f1)
                    unknown.extend(u1)
            for jobid, entry in found.items():
                entry["t"] = started
                state = str(entry.get("job_state", "")).upper()[:1]
                if state == "H" and cache["jobs"].get(jobid, {}).get("job_state") != "H":
                    # e.g. "job held, too many failed attempts to run": PBS will not
                    # start it, and Snakemake waits for it without a word
                    append_line(logfile, "%s job %s is held (comment: %s): it counts as running "
                                "until released (qrls) or deleted (qdel)" % (
                                    now_iso(), jobid, entry.get("comment", "")))
                cache["jobs"][jobid] = entry
                if state in FINAL_STATES:
                    _forget(active, jobid)
            for jobid in unknown:
                # remember whether we saw it run: then it started, whatever
                # the (network) file system shows of its start marker yet
                last = cache["jobs"].get(jobid, {})
                cache["jobs"][jobid] = {"unknown": True, "t": started,
                                        "was": last.get("was") or last.get("job_state")}
                _forget(active, jobid)
        if errors:
            cache["error"] = "; ".join(errors)[:500]
            cache["error_time"] = started
            append_line(logfile, "%s sidecar: qstat failed: %s" % (now_iso(), cache["error"]))
        else:
            cache["error"] = None
            cache["updated"] = started
    else:
        cache["updated"] = started
        cache["error"] = None
    cache["attempted"] = time.time()


def cancel_registered(settings, base):
    """qdel the jobs still registered with the sidecar (not yet seen finished)
    that pbs-cancel has not deleted already."""
    active = os.path.join(base, "active")
    try:
        ids = [j for j in sorted(os.listdir(active)) if valid_jobid(j)]
    except OSError:
        ids = []
    done = set()
    try:
        with open(os.path.join(base, "cancel")) as f:
            done = set(f.read().split())
    except OSError:
        pass
    ids = [j for j in ids if j not in done]
    if not ids:
        return
    logfile = os.path.join(log_dir(settings), "cancel.log")
    rc, out, err = run_cmd([settings.get("qdel", "qdel")] + ids, settings.num("qstat_timeout"))
    append_line(logfile, "%s sidecar: qdel %s -> exit %s %s" % (
        now_iso(), " ".join(ids), rc, " | ".join((out + err).strip().splitlines())))


def _forget(active, jobid):
    try:
        os.remove(os.path.join(active, jobid))
    except OSError:
        pass


def _rmtree(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


# ================================================================= cancel

def cancel_main(argv):
    """qdel the given jobs and any other job this workflow still has registered
    with the sidecar. cluster-generic kills us after 2 s, so qdel runs in its
    own session and may finish after we return."""
    settings = load_settings()
    ids = [a for a in argv if valid_jobid(a.strip())]
    info = sidecar_info()
    if info and info.get("active"):
        try:
            for j in sorted(os.listdir(info["active"])):
                if valid_jobid(j) and j not in ids:
                    ids.append(j)
            marker = os.path.join(os.path.dirname(info["active"]), "cancel")
            with open(marker, "a") as f:
                f.write("\n".join(ids) + "\n")
        except OSError:
            pass
    if not ids:
        return 0
    logfile = os.path.join(log_dir(settings), "cancel.log")
    append_line(logfile, "%s qdel %s" % (now_iso(), " ".join(ids)))
    # Snakemake then lists each of these jobs as an error: say what happened to them
    sys.stderr.write("pbs-cancel: qdel %s (their runs keep their checkpoints: the same command again resumes "
                     "them)\n" % " ".join(ids))
    try:
        os.makedirs(os.path.dirname(logfile), exist_ok=True)
        out = open(logfile, "a")
    except OSError:
        out = subprocess.DEVNULL
    try:
        p = subprocess.Popen(
            [settings.get("qdel", "qdel")] + ids,
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )
    except OSError as e:
        append_line(logfile, "%s qdel could not run: %s" % (now_iso(), e))
        return 0
    try:
        p.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        pass
    return 0
