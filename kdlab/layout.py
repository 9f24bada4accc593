"""Where a run lives (docs/run-files.md), written once and without torch: the workflow's
paths (kdlab.grid), the run configs (kdlab.config) and `kdlab results`, which never imports
torch, share it."""


def format_alpha(alpha):
    return format(float(alpha), "g")


def recipe_name(alpha=None, additive=None):
    """The run-directory level that says how CE and the method combine: alpha_0.5 (convex)
    or additive_ce1_kd0.9 (ce_weight * CE + kd_weight * KD + L_method)."""
    if additive is not None:
        return f"additive_ce{format_alpha(additive['ce_weight'])}_kd{format_alpha(additive['kd_weight'])}"
    return f"alpha_{format_alpha(alpha)}"


def run_path(root, kind, dataset, method=None, recipe=None, teacher=None, student=None, seed=None):
    """A run's directory below `root` (the experiments directory), as the workflow names it."""
    return "/".join([str(root), *map(str, run_dir_parts(kind, dataset, method, recipe, teacher, student, seed))])


def run_dir_parts(kind, dataset, method, recipe, teacher, student, seed):
    """A run's directory below the experiments directory, as components (None for what is not
    known): {dataset}/teachers/{teacher}/{seed}, {dataset}/none/{student}/{seed} or
    {dataset}/{method}/{recipe}/{teacher}_to_{student}/{seed}."""
    if kind == "teacher":
        return [dataset, "teachers", teacher, seed]
    if kind == "student":
        return [dataset, "none", student, seed]
    return [dataset, method, recipe, f"{teacher}_to_{student}" if teacher and student else None, seed]
