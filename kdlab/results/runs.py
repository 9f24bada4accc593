"""Finding runs: walk an experiments directory and summarise each run file.

Reads only the JSON files of the run-directory contract (``docs/run-files.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

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
        return format(float(alpha), "g")
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
                        if e.is_dir():
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
    else:
        # A progress file saying "complete" without metrics.json: finishing, or died
        # between the two writes. Not complete by the contract either way.
        state = {"failed": "failed", "complete": "finishing"}.get(status, "running")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    num_classes = run.get("num_classes") or config.get("num_classes")
    if not num_classes and dataset:
        num_classes = NUM_CLASSES.get(str(dataset).lower().replace("-", "").replace("_", ""))
    epochs_done = data.get("epochs_done")
    if epochs_done is None:
        epochs_done = len(series(hist.get("test_acc")))
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
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
        # What the published-number comparison needs: the recorded training recipe, and
        # for an imported teacher (kdlab import-teacher) where it came from.
        "training": {k: training[k] for k in RECIPE_KEYS if k in training},
        "imported_from": source.get("path") if source else None,
    }


def load_runs(experiments: str, cache: dict | None = None) -> tuple[list[dict], dict, int]:
    """Summaries of every run, reusing cached ones whose file stat is unchanged.

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
                summary = summarize(data, rel, name)
            except (OSError, ValueError) as exc:
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
    return summaries, new_cache, parsed
