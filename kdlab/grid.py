"""The experiment grid as jobs: where every run lives and the config each one gets.

The Snakefile and the tests share this, so the paths (docs/run-files.md) are written
once. A run's config is split: `run` is what the run computes (a Snakemake param, so
changing it reruns exactly that run), `runtime` is how it runs (workers, device),
which may change without rerunning anything.
"""

import hashlib
import os
from dataclasses import dataclass, field

from .config import RUNTIME_KEYS, settings_of
from .layout import recipe_name, run_path
from .methods.ft import PARAPHRASER_KEYS, paraphraser_setting
from .teacher_cache import cache_path, why_not_cached


@dataclass
class Job:
    rule: str
    outputs: list
    run: dict = field(repr=False)
    inputs: list = field(default_factory=list)


def teacher_dir(grid, teacher, seed):
    return run_path(grid["experiments_dir"], "teacher", grid["data"]["dataset"], teacher=teacher, seed=seed)


def student_dir(grid, student, seed):
    return run_path(grid["experiments_dir"], "student", grid["data"]["dataset"], student=student, seed=seed)


def distill_dir(grid, method, recipe, teacher, student, seed):
    """`recipe` is recipe_name(...): alpha_<alpha> or additive_ce<ce>_kd<kd>."""
    return run_path(grid["experiments_dir"], "distill", grid["data"]["dataset"], method, recipe, teacher, student, seed)


def logs_dir(experiments_dir):
    """Where the workflow puts the job logs and timings of the runs in experiments_dir: logs/ for
    experiments/, logs/<name>/ for another, so that two configs run from one directory (config.yaml,
    crd.yaml) do not overwrite each other's logs of same-named runs. A plain directory name is kept
    (logs/experiments_crd); any other path's name ends in a hash of it, so that a/b and a_b, or ../x
    and x, get logs of their own."""
    path = os.path.normpath(experiments_dir)
    if path == "experiments":
        return "logs"
    if os.sep not in path and path not in (".", ".."):
        return f"logs/{path}"
    name = "_".join(part for part in path.split(os.sep) if part not in ("", ".", ".."))
    return f"logs/{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def recipes(grid, method):
    """[(directory name, what the run config gets)] for each way `method` combines with CE:
    its alphas (the global ones unless it lists its own or only additive recipes), then
    its additive recipes."""
    block = grid["methods"][method]
    alphas = block.get("alphas", [] if "additive" in block else grid["alphas"])
    return ([(recipe_name(alpha=a), {"alpha": float(a)}) for a in alphas] +
            [(recipe_name(additive=r), {"additive": r}) for r in block.get("additive", [])])


def paraphraser_path(grid, teacher, settings):
    return (f"{teacher_dir(grid, teacher, grid['teacher_seed'])}/paraphraser_{paraphraser_setting(settings)}/"
            f"paraphraser.pth")


def method_settings(grid, method):
    return settings_of(grid["methods"][method])


# Stage 1 of FT uses only these training keys (and the runtime ones); leaving out the rest
# keeps a change of, say, the students' epochs from rerunning the paraphrasers.
PARAPHRASER_TRAINING_KEYS = {"batch_size", "weight_decay", "deterministic"} | RUNTIME_KEYS["training"]


def run_config(grid, kind, model, seed, method="none", **extra):
    training = {**grid["training"], **grid["teacher_training"]} if kind == "teacher" else grid["training"]
    if kind == "distill":
        training = {k: v for k, v in training.items() if k != "label_smoothing"}  # always hard labels
    if kind == "paraphraser":
        training = {k: v for k, v in training.items() if k in PARAPHRASER_TRAINING_KEYS}
    if kind == "teacher_cache":  # computed from the teacher's weights and the data alone
        kind, training = "teacher", {k: v for k, v in training.items() if k in RUNTIME_KEYS["training"]}
    return {"kind": kind, "model": model, "seed": seed, "method": method, "data": grid["data"],
            "training": training, **extra}


def import_config(grid, teacher):
    """The config of `kdlab import-teacher`: the checkpoint and the data it is tested on; of
    training only the runtime keys (it trains nothing, so no training key reruns it)."""
    training = {**grid["training"], **grid["teacher_training"]}
    return {"kind": "import_teacher", "model": teacher, "seed": grid["teacher_seed"],
            "checkpoint": grid["teacher_checkpoints"][teacher], "data": grid["data"],
            "training": {k: v for k, v in training.items() if k in RUNTIME_KEYS["training"]}}


def expand_grid(grid):
    """Every job of the grid, teachers first; `grid` comes from config.resolve_grid."""
    jobs = {}

    def add(job):
        jobs.setdefault(job.outputs[0], job)

    teachers = dict.fromkeys(p["teacher"] for p in grid["pairs"])
    for teacher in teachers:
        if teacher in grid["teacher_checkpoints"]:  # published: converted, not trained
            d = teacher_dir(grid, teacher, grid["teacher_seed"])
            add(Job("import_teacher", [f"{d}/metrics.json", f"{d}/model.pth"], import_config(grid, teacher),
                    [grid["teacher_checkpoints"][teacher]]))
            continue
        for seed in grid["teacher_seeds"]:
            d = teacher_dir(grid, teacher, seed)
            add(Job("train_teacher", [f"{d}/metrics.json", f"{d}/model.pth"],
                    run_config(grid, "teacher", teacher, seed)))
    weights = {t: f"{teacher_dir(grid, t, grid['teacher_seed'])}/model.pth" for t in teachers}
    if "ft" in grid["methods"]:
        settings = method_settings(grid, "ft")
        for teacher in teachers:
            out = paraphraser_path(grid, teacher, settings)
            add(Job("pretrain_paraphraser", [out],
                    run_config(grid, "paraphraser", teacher, grid["teacher_seed"], "ft", teacher=teacher,
                               teacher_weights=weights[teacher],
                               method_settings={k: settings[k] for k in PARAPHRASER_KEYS}),
                    [weights[teacher]]))
    if grid["plain_students"]:
        for student in dict.fromkeys(p["student"] for p in grid["pairs"]):
            for seed in grid["seeds"]:
                d = student_dir(grid, student, seed)
                add(Job("train_student", [f"{d}/metrics.json", f"{d}/model.pth"],
                        run_config(grid, "student", student, seed)))
    for method in grid["methods"]:
        for recipe, combination in recipes(grid, method):
            for pair in grid["pairs"]:
                teacher, student = pair["teacher"], pair["student"]
                for seed in grid["seeds"]:
                    d = distill_dir(grid, method, recipe, teacher, student, seed)
                    extra = {"teacher": teacher, **combination, "teacher_weights": weights[teacher],
                             "method_settings": method_settings(grid, method)}
                    inputs = [weights[teacher]]
                    if method == "ft":
                        extra["paraphraser"] = paraphraser_path(grid, teacher, method_settings(grid, "ft"))
                        inputs.append(extra["paraphraser"])
                    run = run_config(grid, "distill", student, seed, method, **extra)
                    if why_not_cached(run) is None:  # the cache is an input only where it is read
                        inputs.append(str(cache_path(weights[teacher])))
                        add(Job("cache_teacher", inputs[-1:], run_config(grid, "teacher_cache", teacher,
                                                                         grid["teacher_seed"]), [weights[teacher]]))
                    add(Job("distill", [f"{d}/metrics.json", f"{d}/model.pth"], run, inputs))
    return list(jobs.values())
