"""A stand-in for an OpenPBS server, good enough to test the PBS profile on one
machine: `qsub` starts the job script locally in the background, `qstat`,
`qdel` and `qmgr` answer in OpenPBS's formats and exit codes.

State lives in $PBS_STANDIN_DIR (required):
    jobs/<n>.json   one record per job (removed when job history is off)
    qsub.log        one JSON line per qsub call: {"argv": [...], "cwd": ..., "jobid": ...}
    qstat.log       one JSON line per qstat call
    qdel.log        one JSON line per qdel call
    qmgr.log        one JSON line per qmgr call
    control.json    faults (re-read on every call; missing = no faults):
      {"history": true,                    keep finished jobs (job_state F). Without
                                            it (the default, as on OpenPBS) they
                                            vanish: `qstat` exits 153 "Unknown Job
                                            Id"; `qstat -x` exits 0, lists no job
                                            at all (not even running ones) and
                                            says "PBS is not configured to
                                            maintain job history <id>"
       "qmgr": false,                       qmgr refuses (not allowed / not there)
       "torque_qstat": true,                qstat as on Torque: no -F, and -x means XML
       "qstat_fail_until": <epoch s>,       qstat exits 2 ("cannot connect") until then
       "qstat_badjson_until": <epoch s>,    qstat -F json prints invalid JSON until then
       "qstat_garbage_until": <epoch s>,    qstat prints garbage (any format) until then
       "queue_delay": 0.2,                  seconds a job stays queued
       "kill_delay": 0.5,                   seconds between SIGTERM and SIGKILL
       "seconds_per_walltime_minute": null, enforce walltime, scaled (e.g. 2.0)
       "walltime_kill": [                   kill like a walltime overrun ...
          {"name_regex": "^train", "file": "path/rel/to/qsub/cwd",
           "contains": "step 3 saved", "count": 1}],  ... once file contains text
       "delete_while_queued": [             a user's qdel while the job is queued:
          {"name_regex": "^train", "count": 1}]}   it never starts, writes nothing
Environment variables PBS_STANDIN_HISTORY=1 and PBS_STANDIN_QUEUE_DELAY give
defaults for "history" (default: off) and "queue_delay".
Jobs run in a minimal environment (PATH=/usr/bin:/bin, PBS_* variables, NCPUS
from the select's ncpus) with $PBS_STANDIN_DIR/home as the starting
directory, like a real PBS job.
"""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time

SERVER = "server"
VERSION = "22.05.11"


def state_dir():
    d = os.environ.get("PBS_STANDIN_DIR")
    if not d:
        sys.stderr.write("pbs stand-in: PBS_STANDIN_DIR is not set\n")
        sys.exit(1)
    os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
    return d


class Lock:
    def __init__(self, d):
        self.path = os.path.join(d, "lock")

    def __enter__(self):
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *a):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def control(d):
    try:
        with open(os.path.join(d, "control.json")) as f:
            c = json.load(f)
    except (OSError, ValueError):
        c = {}
    # like OpenPBS, no job history unless the admin enabled it
    c.setdefault("history", os.environ.get("PBS_STANDIN_HISTORY", "0") not in ("0", "no", "false"))
    c.setdefault("queue_delay", float(os.environ.get("PBS_STANDIN_QUEUE_DELAY", "0.2")))
    c.setdefault("kill_delay", 0.5)
    return c


def log_call(d, name, record):
    record["time"] = time.time()
    with open(os.path.join(d, name + ".log"), "a") as f:
        f.write(json.dumps(record) + "\n")


def job_path(d, num):
    return os.path.join(d, "jobs", "%d.json" % num)


def read_job(d, num):
    try:
        with open(job_path(d, num)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_job(d, job):
    p = job_path(d, job["num"])
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(job, f)
    os.replace(tmp, p)


def update_job(d, num, **changes):
    with Lock(d):
        job = read_job(d, num)
        if job is None:
            return None
        job.update(changes)
        write_job(d, job)
        return job


def parse_num(jobid):
    m = re.match(r"^(\d+)(\.|$)", jobid)
    return int(m.group(1)) if m else None


def all_jobs(d):
    out = []
    jobs_dir = os.path.join(d, "jobs")
    names = os.listdir(jobs_dir) if os.path.isdir(jobs_dir) else []
    for name in names:
        if name.endswith(".json"):
            j = read_job(d, int(name[:-5]))
            if j:
                out.append(j)
    return sorted(out, key=lambda j: j["num"])


# ------------------------------------------------------------------ qsub

def qsub_main(argv):
    d = state_dir()
    opts = {"l": [], "v": []}
    script = None
    i = 0
    takes_value = set("NqAljoeSvWPrkmMapc")
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and len(a) >= 2 and a[1] in takes_value:
            value = a[2:] if len(a) > 2 else (argv[i + 1] if i + 1 < len(argv) else "")
            if len(a) == 2:
                i += 1
            if a[1] in ("l", "v"):
                opts[a[1]].append(value)
            else:
                opts[a[1]] = value
        elif a in ("-V", "-h", "-z", "-I"):
            opts[a[1]] = True
        elif a.startswith("-"):
            sys.stderr.write("qsub: invalid option -- '%s'\n" % a.lstrip("-"))
            return 2
        else:
            script = a
        i += 1
    name = opts.get("N") or (os.path.basename(script) if script else "STDIN")
    if not re.match(r"^[A-Za-z][A-Za-z0-9._+-]*$", name) or len(name) > 236:
        sys.stderr.write("qsub: illegal -N value\n")
        log_call(d, "qsub", {"argv": argv, "cwd": os.getcwd(), "error": "bad name"})
        return 2
    if not script or not os.path.isfile(script):
        sys.stderr.write("qsub: script file cannot be loaded - No such file or directory\n")
        return 2
    resources = {}
    for spec in opts["l"]:
        for part in spec.split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                resources[k] = v
    with Lock(d):
        counter = os.path.join(d, "counter")
        try:
            num = int(open(counter).read().strip()) + 1
        except (OSError, ValueError):
            num = 1000
        with open(counter, "w") as f:
            f.write(str(num))
        jobid = "%d.%s" % (num, SERVER)
        # PBS copies the script at submission
        spool = os.path.join(d, "spool")
        os.makedirs(spool, exist_ok=True)
        copy = os.path.join(spool, "%d.SC" % num)
        with open(script) as src, open(copy, "w") as dst:
            dst.write(src.read())
        job = {
            "num": num, "id": jobid, "name": name, "state": "Q", "substate": 10,
            "script": copy, "cwd": os.getcwd(), "output": opts.get("o"),
            "join": opts.get("j"), "shell": opts.get("S") or "/bin/sh",
            "resources": resources, "queue": opts.get("q") or "workq",
            "account": opts.get("A"), "run_count": 0, "qtime": time.time(),
            "exit_status": None, "comment": "Not Running: queued", "delete": False,
            "vars": opts["v"],
        }
        write_job(d, job)
    log_call(d, "qsub", {"argv": argv, "cwd": os.getcwd(), "jobid": jobid})
    runner = [sys.executable, os.path.abspath(__file__), "run", str(num)]
    p = subprocess.Popen(runner, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(d, "runner.err"), "a"),
                         start_new_session=True, env=dict(os.environ))
    update_job(d, num, runner_pid=p.pid)
    print(jobid)
    return 0


# ------------------------------------------------------------------ job runner

def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _file_contains(path, text):
    try:
        with open(path) as f:
            return text in f.read()
    except OSError:
        return False


def run_main(num):
    d = state_dir()
    c = control(d)
    queued_until = time.time() + float(c.get("queue_delay", 0.2))
    job = read_job(d, num)
    while job is not None and not job.get("delete") and time.time() < queued_until:
        time.sleep(0.1)
        job = read_job(d, num)
    if job is None or job.get("delete"):
        return 0
    if _counted_match(d, c, "delete_while_queued", job):
        update_job(d, num, delete=True)
        finish(d, num, None, "Job deleted while queued", 91)
        return 0
    home = os.path.join(d, "home")
    os.makedirs(home, exist_ok=True)
    spool_out = os.path.join(d, "spool", "%d.OU" % num)
    env = {
        "PATH": "/usr/bin:/bin", "HOME": home, "USER": os.environ.get("USER", "user"),
        "LOGNAME": os.environ.get("USER", "user"), "SHELL": "/bin/bash", "LANG": "C.UTF-8",
        "PBS_JOBID": job["id"], "PBS_JOBNAME": job["name"], "PBS_O_WORKDIR": job["cwd"],
        "PBS_O_PATH": os.environ.get("PATH", ""), "PBS_QUEUE": job["queue"],
        "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_NODEFILE": os.path.join(d, "nodefile"),
        "TMPDIR": os.path.join(d, "tmp"), "PBS_STANDIN_DIR": d,
    }
    ncpus = re.search(r"(?:^|:)ncpus=(\d+)", job["resources"].get("select", ""))
    if ncpus:  # OpenPBS sets NCPUS (and OMP_NUM_THREADS) from the first chunk
        env["NCPUS"] = env["OMP_NUM_THREADS"] = ncpus.group(1)
    os.makedirs(env["TMPDIR"], exist_ok=True)
    for v in job.get("vars") or []:
        for part in v.split(","):
            if "=" in part:
                k, val = part.split("=", 1)
                env[k] = val
    out = open(spool_out, "w")
    shell = job.get("shell") or "/bin/sh"
    proc = subprocess.Popen([shell, job["script"]], cwd=home, env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.time()
    update_job(d, num, state="R", substate=42, pid=proc.pid, pgid=proc.pid, stime=start,
               run_count=job.get("run_count", 0) + 1,
               comment="Job run at %s on (node1:ncpus=1)" % time.ctime(start))
    killed = None  # "walltime" | "delete"
    wall = _walltime_s(job["resources"].get("walltime"))
    while proc.poll() is None:
        time.sleep(0.1)
        cur = read_job(d, num) or {}
        c = control(d)
        if cur.get("delete"):
            killed = "delete"
        else:
            scale = c.get("seconds_per_walltime_minute")
            if scale and wall and time.time() - start > wall / 60.0 * float(scale):
                killed = "walltime"
            elif _walltime_trigger(d, c, job):
                killed = "walltime"
        if killed:
            _killpg(proc.pid, signal.SIGTERM)
            deadline = time.time() + float(c.get("kill_delay", 0.5))
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    rc = proc.returncode
    # the job's whole process group is gone when PBS is done with it
    _killpg(proc.pid, signal.SIGKILL)
    out.close()
    if killed == "walltime":
        exit_status = -29
        comment = "Job run at %s on (node1:ncpus=1) and exceeded resource walltime" % time.ctime(start)
    elif killed == "delete":
        # the job shell's own end: 256 + N if a signal killed it, else its exit
        # code (the profile's job script traps SIGTERM and exits 143)
        exit_status = rc if rc >= 0 else 256 - rc
        comment = "Job run at %s on (node1:ncpus=1) and was deleted" % time.ctime(start)
        substate = 91
    else:
        exit_status = rc if rc >= 0 else 256 - rc
        comment = "Job run at %s on (node1:ncpus=1) and finished" % time.ctime(start)
    update_job(d, num, state="E", substate=51)
    time.sleep(0.2)
    # stage out the output like PBS does at the end
    if job.get("output"):
        try:
            os.makedirs(os.path.dirname(job["output"]), exist_ok=True)
            with open(spool_out) as src, open(job["output"], "w") as dst:
                dst.write(src.read())
                if killed == "walltime":
                    dst.write("=>> PBS: job killed: walltime %d exceeded limit %d\n"
                              % (int(time.time() - start), wall or 0))
        except OSError:
            pass
    if killed != "delete":
        substate = 93 if exit_status != 0 else 92
    finish(d, num, exit_status, comment, substate)
    return 0


def finish(d, num, exit_status, comment, substate):
    c = control(d)
    with Lock(d):
        job = read_job(d, num)
        if job is None:
            return
        if not c.get("history", True):
            os.remove(job_path(d, num))
            return
        job.update(state="F", substate=substate, exit_status=exit_status, comment=comment,
                   mtime=time.time())
        write_job(d, job)


def _walltime_s(text):
    if not text:
        return None
    secs = 0
    for p in str(text).split(":"):
        secs = secs * 60 + int(p)
    return secs


def _walltime_trigger(d, c, job):
    return _counted_match(d, c, "walltime_kill", job, lambda rule: _file_contains(
        os.path.join(job["cwd"], rule["file"]), rule.get("contains", "")))


def _counted_match(d, c, key, job, condition=lambda rule: True):
    """Whether a rule of control[key] (name_regex, count) applies to the job
    now; each rule applies `count` times in all."""
    for i, rule in enumerate(c.get(key) or []):
        if not re.search(rule.get("name_regex", ""), job["name"]):
            continue
        done_path = os.path.join(d, "%s.%d.count" % (key, i))
        try:
            used = int(open(done_path).read())
        except (OSError, ValueError):
            used = 0
        if used >= int(rule.get("count", 1)):
            continue
        if condition(rule):
            with Lock(d):
                with open(done_path, "w") as f:
                    f.write(str(used + 1))
            return True
    return False


# ------------------------------------------------------------------ qstat

def _json_job(job):
    res = dict(job["resources"])
    rec = {
        "Job_Name": job["name"],
        "Job_Owner": "%s@head" % os.environ.get("USER", "user"),
        "job_state": job["state"],
        "queue": job["queue"],
        "server": SERVER,
        "Checkpoint": "u",
        "ctime": time.ctime(job["qtime"]),
        "Error_Path": "head:%s" % (job.get("output") or ""),
        "Output_Path": "head:%s" % (job.get("output") or ""),
        "Join_Path": job.get("join") or "n",
        "Priority": 0,
        "Rerunable": "True",
        "Resource_List": res,
        "substate": job["substate"],
        # PBS passes environment values through unescaped in some versions
        "Variable_List": {"PBS_O_HOME": "/home/user", "PBS_O_WORKDIR": job["cwd"],
                          "PBS_O_SYSTEM": "Linux"},
        "comment": job.get("comment", ""),
        "run_count": job.get("run_count", 0),
        "project": "_pbs_project_default",
    }
    if job.get("exit_status") is not None:
        rec["Exit_status"] = job["exit_status"]
    if job["state"] in ("R", "E", "F"):
        rec["exec_host"] = "node1/0"
        rec["resources_used"] = {"cput": "00:00:01", "mem": "1024kb", "ncpus": 1,
                                 "walltime": "00:00:01"}
    return rec


def _text_job(jobid, rec):
    lines = ["Job Id: %s" % jobid]

    def add(key, value):
        line = "    %s = %s" % (key, value)
        # qstat -f wraps long lines; continuation lines start with a tab
        while len(line) > 79:
            lines.append(line[:79])
            line = "\t" + line[79:]
        lines.append(line)

    for k, v in rec.items():
        if isinstance(v, dict):
            if k == "Variable_List":
                add(k, ",".join("%s=%s" % kv for kv in v.items()))
            else:
                for k2, v2 in v.items():
                    add("%s.%s" % (k, k2), v2)
        else:
            add(k, v)
    return "\n".join(lines) + "\n"


def qstat_main(argv):
    d = state_dir()
    c = control(d)
    log_call(d, "qstat", {"argv": argv})
    history = "-x" in argv or "-H" in argv
    full = "-f" in argv
    fmt_json = False
    ids = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-F":
            fmt_json = i + 1 < len(argv) and argv[i + 1] == "json"
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        ids.append(a)
        i += 1
    now = time.time()
    if now < float(c.get("qstat_fail_until", 0)):
        sys.stderr.write("Connection refused\nqstat: cannot connect to server %s (errno=15010)\n" % SERVER)
        return 2
    if c.get("torque_qstat"):
        if "-F" in argv:
            sys.stderr.write("qstat: invalid option -- 'F'\n")
            return 2
        if history:
            sys.stdout.write("<Data>%s</Data>\n" % "".join(
                "<Job><Job_Id>%s</Job_Id><job_state>%s</job_state></Job>" % (j["id"], j["state"])
                for j in all_jobs(d) if j["id"] in ids))
            return 0
    if now < float(c.get("qstat_garbage_until", 0)):
        sys.stdout.write("\x00\x1b[2Jqstat: <html>502 Bad Gateway</html> %%% {{{\n")
        return 0
    if history and not c["history"]:
        # OpenPBS's server rejects every -x request when job_history_enable is
        # unset (req_stat_job: PBSE_JOBHISTNOTSET), whatever the jobs' states:
        # one message per id, no job listed, exit 0 (observed on OpenPBS 23.06)
        for jid in ids or [""]:
            sys.stderr.write(("qstat: PBS is not configured to maintain job history %s" % jid).rstrip() + "\n")
        if fmt_json:
            sys.stdout.write(json.dumps({"timestamp": int(now), "pbs_version": VERSION,
                                         "pbs_server": SERVER}, indent=4) + "\n")
        return 0
    if not ids:
        ids = [j["id"] for j in all_jobs(d) if history or j["state"] != "F"]
    found = []
    rc = 0
    for jid in ids:
        num = parse_num(jid)
        job = read_job(d, num) if num is not None else None
        if job is None:
            sys.stderr.write("qstat: Unknown Job Id %s\n" % jid)
            rc = 153
            continue
        if job["state"] == "F" and not history:
            sys.stderr.write("qstat: %s Job has finished, use -x or -H to obtain historical job information\n" % jid)
            rc = 35
            continue
        found.append(job)
    if fmt_json:
        data = {"timestamp": int(now), "pbs_version": VERSION, "pbs_server": SERVER}
        if found:
            data["Jobs"] = {j["id"]: _json_job(j) for j in found}
        text = json.dumps(data, indent=4)
        if now < float(c.get("qstat_badjson_until", 0)) and found:
            # the known OpenPBS bug: an environment value with a quote, unescaped
            text = text.replace('"PBS_O_SYSTEM": "Linux"', '"PBS_O_SYSTEM": "Lin"ux", "BASH_FUNC_x%%": "() {  echo "hi"\n}"')
        if found or rc == 0:
            sys.stdout.write(text + "\n")
    elif full:
        for j in found:
            sys.stdout.write(_text_job(j["id"], _json_job(j)) + "\n")
    else:
        if found:
            sys.stdout.write("Job id            Name             User              Time Use S Queue\n")
            sys.stdout.write("----------------  ---------------- ----------------  -------- - -----\n")
            for j in found:
                sys.stdout.write("%-17s %-16s %-17s %8s %s %s\n" % (
                    j["id"], j["name"][:16], "user", "0", j["state"], j["queue"]))
    return rc


# ------------------------------------------------------------------ qdel

def qdel_main(argv):
    d = state_dir()
    ids = [a for a in argv if not a.startswith("-")]
    log_call(d, "qdel", {"argv": argv})
    rc = 0
    for jid in ids:
        num = parse_num(jid)
        with Lock(d):
            job = read_job(d, num) if num is not None else None
            if job is None:
                sys.stderr.write("qdel: Unknown Job Id %s\n" % jid)
                rc = 153
                continue
            if job["state"] == "F":
                sys.stderr.write("qdel: Job has finished %s\n" % jid)
                rc = 35
                continue
            queued = job["state"] == "Q"
            job["delete"] = True
            write_job(d, job)
        if queued:
            finish(d, num, None, "Job deleted while queued", 91)
    return rc


# ------------------------------------------------------------------ qmgr

def qmgr_main(argv):
    """Only `qmgr -c 'list server job_history_enable'`, as OpenPBS prints it
    (the attribute is listed only when set)."""
    d = state_dir()
    c = control(d)
    log_call(d, "qmgr", {"argv": argv})
    if not c.get("qmgr", True):
        sys.stderr.write("qmgr: Unauthorized Request \n")
        return 1
    command = argv[argv.index("-c") + 1] if "-c" in argv[:-1] else ""
    if command.split()[:2] != ["list", "server"]:
        sys.stderr.write("qmgr: stand-in knows only 'list server'\n")
        return 2
    sys.stdout.write("Server %s\n" % SERVER)
    if c["history"]:
        sys.stdout.write("\tjob_history_enable = True\n")
    return 0


def fake_job(d, num, **fields):
    """Write a job record directly (unit tests of the status program)."""
    os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
    job = {
        "num": num, "id": "%d.%s" % (num, SERVER), "name": "fake%d" % num, "state": "Q",
        "substate": 10, "script": "", "cwd": d, "output": None, "join": "oe",
        "shell": "/bin/bash", "resources": {"walltime": "00:01:00"}, "queue": "workq",
        "account": None, "run_count": 0, "qtime": time.time(), "exit_status": None,
        "comment": "", "delete": False, "vars": [],
    }
    job.update(fields)
    write_job(d, job)
    return job["id"]


def cleanup(d):
    """Stop whatever stand-in jobs are still queued or running (test teardown)."""
    jobs = [j for j in all_jobs(d) if j["state"] in ("R", "E", "Q")]
    for job in jobs:
        update_job(d, job["num"], delete=True)
    for job in jobs:
        if job.get("pgid"):
            _killpg(job["pgid"], signal.SIGKILL)
    time.sleep(0.3)
    for job in jobs:
        for key in ("runner_pid",):
            if job.get(key):
                try:
                    os.kill(job[key], signal.SIGKILL)
                except OSError:
                    pass
    return len(jobs)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        sys.exit(run_main(int(sys.argv[2])))
    sys.stderr.write("usage: standin.py run <num>\n")
    sys.exit(2)
