# Paths (docs/run-files.md), wildcard constraints and the lookups that give each job
# its config. A run's config is split in two: `run` (a param: changing it reruns the
# run) and `runtime` (workers, device, data_dir: changing it reruns nothing).

TEACHER = EXP + "/{dataset}/teachers/{teacher}/{seed}"
STUDENT = EXP + "/{dataset}/none/{student}/{seed}"
DISTILL = EXP + "/{dataset}/{method}/alpha_{alpha}/{teacher}_to_{student}/{seed}"
PARAPHRASER = TEACHER + "/paraphraser_{setting}/paraphraser.pth"


wildcard_constraints:
    dataset=GRID["data"]["dataset"],
    teacher="|".join(BLOCKS_PER_STAGE),
    student="|".join(BLOCKS_PER_STAGE),
    method="|".join(name for name, m in METHODS.items() if m.NEEDS_TEACHER),
    alpha=r"[0-9.]+",
    seed=r"[0-9]+",
    setting=r"[A-Za-z0-9._+-]+",


def job(first_output):
    """The grid's job whose first output is `first_output` formatted with the wildcards."""
    return lambda wildcards: JOBS[first_output.format(**wildcards)]


def run_param(first_output):
    return lambda wildcards: json.dumps(split_runtime(job(first_output)(wildcards).run)[0], sort_keys=True)


def runtime_arg(kind):
    """Quoted JSON of the runtime settings of a kind of run (a global, so not a rerun trigger)."""
    training = {**GRID["training"], **GRID["teacher_training"]} if kind == "teacher" else GRID["training"]
    return shlex.quote(json.dumps(split_runtime({"data": GRID["data"], "training": training})[1]))


RUNTIME_TEACHER = runtime_arg("teacher")
RUNTIME_STUDENT = runtime_arg("student")
VERSIONS = shlex.quote(json.dumps(method_versions()))


def runtime_minutes(rule_name):
    """Walltime for Snakemake/PBS: the configured minutes, doubled on every retry."""
    return lambda wildcards, attempt: RES["runtime"][rule_name] * 2 ** (attempt - 1)
