# Paths (docs/run-files.md), wildcard constraints and the lookups that give each job
# its config. A run's config is split in two: `run` (a param: changing it reruns the
# run) and its runtime settings (workers, device, data_dir: changing them reruns
# nothing), which reach `kdlab` through the environment variables set below, so that
# they are neither params nor part of the shell command's text.

TEACHER = run_path(EXP, "teacher", "{dataset}", teacher="{teacher}", seed="{seed}")
STUDENT = run_path(EXP, "student", "{dataset}", student="{student}", seed="{seed}")
DISTILL = run_path(EXP, "distill", "{dataset}", "{method}", "{recipe}", "{teacher}", "{student}", "{seed}")
PARAPHRASER = f"{TEACHER}/paraphraser_{{setting}}/paraphraser.pth"
LOGS = logs_dir(EXP)  # job logs and timings: logs/ for experiments/, else logs/<a name for it>/
ENV = "../envs/kdlab.yaml"  # for --software-deployment-method conda; the Makefile's .venv is the default
# `kdlab` in a rule's shell command is this shell function: the package run by the
# interpreter that runs Snakemake (locally and in cluster jobs, which Snakemake starts
# with the same interpreter), so neither PATH nor an activated venv matters. Under
# --software-deployment-method conda, the env's python. A function, not a changed
# command text: Snakemake reruns every job whose shell command's text changes.
KDLAB_PYTHON = ("python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
                else shlex.quote(sys.executable))
# (shell.prefix is formatted like a rule's command: {{{{ becomes {{ here and { there.)
shell.prefix(f'set -euo pipefail; kdlab() {{{{ {KDLAB_PYTHON} -m kdlab "$@"; }}}}; ')


wildcard_constraints:
    dataset=GRID["data"]["dataset"],
    teacher="|".join(BLOCKS_PER_STAGE),
    student="|".join(BLOCKS_PER_STAGE),
    method="|".join(name for name, m in METHODS.items() if m.NEEDS_TEACHER),
    recipe=r"alpha_[0-9.]+|additive_ce[0-9.]+_kd[0-9.]+",  # kdlab.layout.recipe_name
    seed=r"[0-9]+",
    setting=r"[A-Za-z0-9._+-]+",

# Teachers named in teacher_checkpoints are imported (rule import_teacher), the others trained
# (train_teacher): each rule's own constraint keeps the two from claiming the same output.
IMPORTED_TEACHERS = "|".join(GRID["teacher_checkpoints"]) or "(?!)"
TRAINED_TEACHERS = "|".join(t for t in BLOCKS_PER_STAGE if t not in GRID["teacher_checkpoints"]) or "(?!)"


def job(first_output):
    """The grid's job whose first output is `first_output` formatted with the wildcards."""
    return lambda wildcards: JOBS[first_output.format(**wildcards)]


def run_param(first_output):
    return lambda wildcards: json.dumps(split_runtime(job(first_output)(wildcards).run)[0], sort_keys=True)


def runtime_settings(kind):
    training = {**GRID["training"], **GRID["teacher_training"]} if kind == "teacher" else GRID["training"]
    return json.dumps(split_runtime({"data": GRID["data"], "training": training})[1])


os.environ["KDLAB_RUNTIME_TEACHER"] = runtime_settings("teacher")
os.environ["KDLAB_RUNTIME_STUDENT"] = runtime_settings("student")


envvars:
    "KDLAB_RUNTIME_TEACHER",
    "KDLAB_RUNTIME_STUDENT",


def runtime_minutes(rule_name):
    """Walltime for Snakemake/PBS: the configured minutes, doubled on every retry."""
    return lambda wildcards, attempt: RES["runtime"][rule_name] * 2 ** (attempt - 1)
