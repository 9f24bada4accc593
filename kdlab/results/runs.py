"""Finding runs: walk an experiments directory and summarise each run file.

Reads only the JSON files of the run-directory contract (``docs/run-files.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any

from ..layout import format_alpha, recipe_name, run_dir_parts
from ..runio import json_intact

# Fallback when a run does not record num_classes (lower-cased dataset name).
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10,
               "svhn": 10, "stl10": 10, "tinyimagenet": 200, "imagenet": 1000}

# The training keys a published recipe is compared on (kdlab.results.published).
RECIPE_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule",
               "milestones", "lr_decay", "label_smoothing", "amp")


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def num(x: Any) -> float:
    """JSON value -> float; None/garbage/inf -> nan (plots show a gap)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def series(values: Any) -> list[float]:
    if not isinstance(values, list):
        return []
    return [num(v) for v in values]


def fmt_alpha(alpha: Any) -> str:
    """Alpha the way the run directories spell it (``format(alpha, "g")``)."""
    if alpha is None or alpha == "":
        return ""
    try:
        return format_alpha(alpha)
    except (TypeError, ValueError):
        return str(alpha)


def setting_alpha(setting: str) -> str:
    """The alpha of a convex-form setting ``alpha_<a>``; "" for any other loss form."""
    return setting[len("alpha_"):] if setting.startswith("alpha_") else ""


def setting_label(setting: str) -> str:
    """``alpha_0.5`` -> ``α 0.5``; another form's directory name with spaces for ``_``."""
    a = setting_alpha(setting)
    return f"α {a}" if a else setting.replace("_", " ")


def setting_sort_key(setting: str) -> tuple:
    try:
        return (0, float(setting_alpha(setting)), setting)
    except ValueError:
        return (1, 0.0, setting)


def parse_run_path(rel: str) -> dict:
    """Identity of a run from its path relative to the experiments directory.

    A distilled run is ``{dataset}/{method}/{setting}/{teacher}_to_{student}/{seed}``,
    where the grid names ``setting`` after the run's loss form and weights
    (``alpha_0.5``, or e.g. ``additive_ce1_kd0.9``).
    """
    parts = rel.split("/")
    out: dict[str, Any] = {}
    if len(parts) == 4 and parts[1] == "teachers":
        out = {"kind": "teacher", "dataset": parts[0], "model": parts[2], "seed": parts[3]}
    elif len(parts) == 4 and parts[1] == "none":
        out = {"kind": "student", "dataset": parts[0], "method": "none", "model": parts[2],
               "seed": parts[3]}
    elif len(parts) == 5 and "_to_" in parts[3]:
        teacher, student = parts[3].split("_to_", 1)
        out = {"kind": "distill", "dataset": parts[0], "method": parts[1],
               "setting": parts[2], "teacher": teacher, "student": student, "seed": parts[4]}
    if "seed" in out:
        try:
            out["seed"] = int(out["seed"])
        except ValueError:
            pass
    return out


# A run directory of the grid's layout (docs/run-files.md), as its last path components:
# a seed (the schema's seeds are integers >= 0) under ``teachers/{model}``, ``none/{model}``
# or ``{recipe}/{teacher}_to_{student}``.
SEED_DIR = re.compile(r"[0-9]+")
RECIPE_DIR = re.compile(r"alpha_[^/]+|additive_ce[^/]+_kd[^/]+")
KIND_WORDS = {"teacher": "teacher", "student": "plain student", "distill": "distilled student"}


def layout_depth(rel: str) -> int:
    """How many components a run directory of the grid's layout has, judged by the last three
    of a run path: 4 (``{dataset}/teachers|none/{model}/{seed}``), 5 (``{dataset}/{method}/
    {recipe}/{teacher}_to_{student}/{seed}``) or 0 (another layout: nothing is checked there).
    The path may have more components (EXPERIMENTS above the tree) or fewer (EXPERIMENTS a
    dataset's directory)."""
    parts = rel.split("/")
    if len(parts) < 3 or not SEED_DIR.fullmatch(parts[-1]):
        return 0
    if parts[-3] in ("teachers", "none"):
        return 4
    if RECIPE_DIR.fullmatch(parts[-3]) and "_to_" in parts[-2]:
        return 5
    return 0


def seed_text(seed: Any) -> str | None:
    """A seed as its directory name (0, 0.0 and "0" are all "0")."""
    if seed is None or isinstance(seed, bool):
        return None
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    return str(seed)


def recorded_recipe(run: dict) -> str | None:
    """The recipe level a run block names (kdlab.layout.recipe_name), or None if it does not
    say: its ``recipe``; for older files its alpha, or its additive weights."""
    if isinstance(run.get("recipe"), str) and run["recipe"]:
        return run["recipe"]
    try:
        if run.get("alpha") is not None:
            return recipe_name(alpha=run["alpha"])
        if run.get("ce_weight") is not None and run.get("kd_weight") is not None:
            return recipe_name(additive=run)
    except (TypeError, ValueError):  # not a number: the block names no directory of the grid
        pass
    return None


def claimed_dir(run: dict) -> list[str | None] | None:
    """The run directory a ``metrics.json`` "run" block names, relative to the experiments
    directory, as components; None where the block does not say (None for a kind it does not
    name)."""
    kind = run.get("kind")

    def text(x: Any) -> str | None:
        return x if isinstance(x, str) and x else None

    if kind not in ("teacher", "student", "distill"):
        return None
    teacher, student = text(run.get("teacher")), text(run.get("student"))
    if kind == "teacher":  # "student" names the model trained; older writers used "teacher"
        teacher = student or teacher
    return run_dir_parts(kind, text(run.get("dataset")), text(run.get("method")), recorded_recipe(run), teacher,
                      student, seed_text(run.get("seed")))


def show_dir(parts: list[str | None]) -> str:
    return "/".join(p if p is not None else "?" for p in parts)


def identity(s: dict) -> tuple | None:
    """What a run is (kind, dataset, method, recipe, teacher, student, seed), from its summary;
    None where that is not fully known (such runs are never called duplicates)."""
    kind = s.get("kind")
    need = {"teacher": ("teacher",), "student": ("student",),
            "distill": ("method", "setting", "teacher", "student")}.get(kind)
    key = (kind, s.get("dataset"), s.get("method"), s.get("setting") or "", s.get("teacher"),
           s.get("student"), seed_text(s.get("seed")))
    if need is None or not key[1] or key[6] is None or not all(s.get(k) for k in need):
        return None
    return tuple(str(x) if x is not None else "" for x in key)


def check_placement(summaries: list[dict]) -> None:
    """Mark the runs that must not be used, in place.

    ``misplaced``: the directory its run block names (shown with ``?`` for what the block
    leaves out), when the run lies in a run directory of the grid's layout (layout_depth)
    whose last components disagree with it. ``duplicates``: for every run of a group
    claiming the same identity, ``{"kind", "claims": the directory of that identity, "runs":
    [their paths], "used": the one whose path matches its block (or, without a block, gave
    it its identity), if exactly one does, else None}``. Runs in another layout are not
    checked against their path, but they do count as duplicates.
    """
    placed: set[str] = set()
    for s in summaries:
        s.pop("misplaced", None)
        s.pop("duplicates", None)
        claim, depth = s.get("claimed"), layout_depth(s["rel"])
        if not depth or s.get("state") == "unreadable":
            continue
        tail = s["rel"].split("/")[-depth:]  # compared from the seed upwards
        if claim and (len(claim) != depth or any(
                c is not None and c != t for c, t in zip(reversed(claim), reversed(tail)))):
            s["misplaced"] = show_dir(claim)
        else:
            placed.add(s["rel"])
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        key = None if "misplaced" in s or s.get("state") == "unreadable" else identity(s)
        if key:
            groups.setdefault(key, []).append(s)
    for key, group in groups.items():
        if len(group) > 1:
            matching = [s["rel"] for s in group if s["rel"] in placed]
            entry = {"kind": key[0], "claims": show_dir(run_dir_parts(*key)), "runs": [s["rel"] for s in group],
                     "used": matching[0] if len(matching) == 1 else None}
            for s in group:
                s["duplicates"] = entry


def left_out(s: dict) -> str | None:
    """Why a run is not used at all ("misplaced" or "duplicate"), or None."""
    if "misplaced" in s:
        return "misplaced"
    if s.get("duplicates") and s["duplicates"]["used"] != s["rel"]:
        return "duplicate"
    return None


def scan_runs(experiments: str) -> list[tuple[str, str]]:
    """``(relative run path, file name)`` for every directory holding a run file.

    ``metrics.json`` wins over ``progress.json``. Hidden directories are skipped;
    symlinked directories are followed once.
    """
    found: list[tuple[str, str]] = []
    if not os.path.isdir(experiments):
        return found
    seen: set[tuple[int, int]] = set()
    stack = [experiments]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            files = set()
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        # A run file that is a directory is a damaged run file (listed unreadable), not a run.
                        if e.is_dir() and e.name not in ("metrics.json", "progress.json"):
                            stack.append(e.path)
                        else:
                            files.add(e.name)
                    except OSError:
                        continue
        except OSError:
            continue
        name = "metrics.json" if "metrics.json" in files else (
            "progress.json" if "progress.json" in files else None)
        if name:
            rel = os.path.relpath(d, experiments).replace(os.sep, "/")
            found.append((rel, name))
    found.sort()
    return found


def summarize(data: dict, rel: str, filename: str) -> dict:
    """The few fields the table and the health list need, from one run file."""
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    guess = parse_run_path(rel)
    kind = run.get("kind") or guess.get("kind")
    dataset = run.get("dataset") or guess.get("dataset")
    setting = ""
    if kind == "teacher":
        model = run.get("student") or run.get("teacher") or guess.get("model")
        teacher, student, method = model, None, None
    elif kind == "student":
        model = run.get("student") or guess.get("model")
        teacher, student, method = None, model, "none"
    else:
        teacher = run.get("teacher") or guess.get("teacher")
        student = run.get("student") or guess.get("student")
        method = run.get("method") or guess.get("method")
        # How CE and the method combine, as the run recorded it ("recipe": alpha_0.5,
        # additive_ce1_kd0.9); for older files, the directory level the grid names after
        # it, or the recorded alpha of the convex form.
        setting = (run.get("recipe") if isinstance(run.get("recipe"), str) else None) \
            or guess.get("setting") \
            or (f"alpha_{fmt_alpha(run['alpha'])}" if run.get("alpha") is not None else "")
    seed = run.get("seed", guess.get("seed"))
    hist = data.get("history") if isinstance(data.get("history"), dict) else {}
    accs = series(hist.get("test_acc"))
    test_acc = [v for v in accs if not math.isnan(v)]
    best = num(data.get("best_acc"))
    if math.isnan(best) and test_acc:
        best = max(test_acc)
    # The best epoch, 1-based, from the history itself (writers differ on whether
    # best_epoch counts from 0 or 1); the file's own value only without a history.
    best_epoch = data.get("best_epoch")
    if test_acc and not math.isnan(best):
        hits = [i for i, v in enumerate(accs) if abs(v - best) <= 1e-9 * max(1.0, abs(best))]
        best_epoch = hits[0] + 1 if hits else None
    last = num(data.get("last_acc"))
    if math.isnan(last) and test_acc:
        last = test_acc[-1]
    status = data.get("status") or ("complete" if filename == "metrics.json" else "running")
    if filename == "metrics.json":
        state = "failed" if status == "failed" else "complete"
        if state == "complete" and (math.isnan(best) or math.isnan(last)):
            # Not kdlab's (which always records both): counted among the seeds, such a run
            # would make n_seeds disagree with the means; listed as unreadable instead.
            missing = " and ".join(k for k, v in (("best_acc", best), ("last_acc", last)) if math.isnan(v))
            return {"rel": rel, "file": filename, "state": "unreadable", **guess,
                    "error": f"{filename}: no finite {missing} and no history.test_acc to take it from"}
    else:
        # A progress file saying "complete" (written after metrics.json and the finished checkpoint)
        # without metrics.json: removed since, by hand or by Snakemake. Not complete by the contract.
        state = {"failed": "failed", "complete": "finishing", "interrupted": "interrupted"}.get(status, "running")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    recipe = {k: training[k] for k in RECIPE_KEYS if k in training}
    num_classes = run.get("num_classes") or config.get("num_classes")
    if not num_classes and dataset:
        num_classes = NUM_CLASSES.get(str(dataset).lower().replace("-", "").replace("_", ""))
    epochs_done = data.get("epochs_done")
    if epochs_done is None:
        epochs_done = len(series(hist.get("test_acc")))
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    resumes = prov.get("resumes") if isinstance(prov.get("resumes"), list) else []
    resumes = [r for r in resumes if isinstance(r, dict)]
    source = data.get("source") if isinstance(data.get("source"), dict) else None
    return {
        "rel": rel, "file": filename, "state": state, "status": status,
        "error": data.get("error"), "kind": kind, "dataset": dataset, "method": method,
        "setting": setting, "alpha": setting_alpha(setting), "teacher": teacher,
        "student": student, "seed": seed,
        "num_classes": num_classes, "method_version": data.get("method_version"),
        "epochs_planned": data.get("epochs_planned"), "epochs_done": epochs_done,
        "best_acc": None if math.isnan(best) else best,
        "last_acc": None if math.isnan(last) else last,
        "best_epoch": best_epoch, "teacher_acc": data.get("teacher_acc"),
        # Teachers and plain students are trained with method "none": its version counts.
        "version_method": run.get("method") or (method if kind == "distill" else "none"),
        "started": prov.get("started"), "finished": prov.get("finished"),
        # The code (kdlab's and torch's hash) of the process that started the run and of
        # each resume: more than one means its epochs come from different code.
        "code_sha256s": sorted({prov.get("code_sha256"), *(r.get("code_sha256") for r in resumes)} - {None}),
        "resumed_at": data.get("resumed_at_epochs") or [r.get("epoch") for r in resumes],
        # What the published-number comparison needs: the recorded training recipe, and
        # for an imported teacher (kdlab import-teacher) where it came from.
        "training": recipe,
        # What the run was trained with, beyond its directory: runs of one table row that
        # differ in it (another config into the same experiments directory, or a grid half
        # rerun after a change) are counted as several recipes (table.n_recipes).
        "recipe_digest": digest(json.dumps([recipe, config.get("method_settings"), data.get("epochs_planned")],
                                           sort_keys=True, default=str).encode()),
        "imported_from": source.get("path") if source else None,
        # Where the run block says this run belongs (check_placement).
        "claimed": claimed_dir(run) if run else None,
    }


def load_runs(experiments: str, cache: dict | None = None) -> tuple[list[dict], dict, int]:
    """Summaries of every run, reusing cached ones whose file stat is unchanged, with the
    misplaced and duplicate runs marked (check_placement).

    Returns (summaries, new cache, number of files actually parsed).
    """
    cache = cache or {}
    new_cache: dict[str, dict] = {}
    summaries: list[dict] = []
    parsed = 0
    for rel, name in scan_runs(experiments):
        path = os.path.join(experiments, rel, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        entry = cache.get(rel)
        if (entry and entry.get("file") == name and entry.get("mtime_ns") == st.st_mtime_ns
                and entry.get("size") == st.st_size):
            new_cache[rel] = entry
            summary = dict(entry["summary"])
        else:
            parsed += 1
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("top level is not a JSON object")
                if not json_intact(data):
                    raise ValueError("damaged: its content does not match its checksum (sha256)")
                summary = summarize(data, rel, name)
            except (OSError, ValueError, RecursionError) as exc:
                raw = b""
                summary = {"rel": rel, "file": name, "state": "unreadable",
                           "error": f"{name}: {exc}"}
                summary.update(parse_run_path(rel))
            entry = {"file": name, "mtime_ns": st.st_mtime_ns, "size": st.st_size,
                     "digest": digest(raw), "summary": summary}
            new_cache[rel] = entry
            summary = dict(summary)
        summary["mtime"] = st.st_mtime
        summary["digest"] = entry["digest"]
        summaries.append(summary)
    check_placement(summaries)
    return summaries, new_cache, parsed
