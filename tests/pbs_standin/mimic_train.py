"""Stand-in for `kdlab train`: a "training" that checkpoints every step, resumes
from its checkpoint, and writes its declared output only at the end.

    python mimic_train.py RUN_DIR OUTPUT STEPS STEP_SECONDS

RUN_DIR/checkpoint.json  {"step": n}   (never a Snakemake output)
RUN_DIR/starts.txt       one line per start: the step it started from
RUN_DIR/train.log        "step n saved" lines (the stand-in's walltime trigger)
"""
import json
import os
import sys
import time


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    run_dir, output, steps, step_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    os.makedirs(run_dir, exist_ok=True)
    ckpt = os.path.join(run_dir, "checkpoint.json")
    start = 0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            start = json.load(f)["step"]
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    with open(os.path.join(run_dir, "starts.txt"), "a") as f:
        f.write("%d\n" % start)
    print("python %s (venv: %s); %s" % (sys.executable, in_venv,
          "resumed from step %d" % start if start else "starting fresh"), flush=True)
    if not in_venv:
        print("ERROR: not running in the project's virtualenv", flush=True)
        return 3
    for step in range(start, steps):
        time.sleep(step_s)
        write_atomic(ckpt, json.dumps({"step": step + 1}))
        with open(os.path.join(run_dir, "train.log"), "a") as f:
            f.write("step %d saved\n" % (step + 1))
        print("step %d saved" % (step + 1), flush=True)
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    write_atomic(output, json.dumps({"steps": steps, "pbs_job_id": os.environ.get("PBS_JOBID")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
