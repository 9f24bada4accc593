"""``kdlab results``: tables, figures and a health list from an experiments directory.

Reads only the JSON files of the run-directory contract (``docs/run-files.md``):
``metrics.json`` marks a complete run, ``progress.json`` a running, finishing or
failed one. It never imports torch, so it runs anywhere (login node, cron, PBS).

Outputs, all written atomically (temporary file in the same directory, then
``os.replace``) into ``--out``:

* ``results.csv`` / ``results.md``  the table (one row per dataset/pair/method/alpha,
  plus teacher and plain-student rows), mean and sample std (ddof=1) over seeds;
* ``health.json`` / ``health.md``   incomplete, failed, near-chance and outdated runs;
* ``accuracy_vs_alpha.png``, ``methods_at_best_alpha.png``  aggregate figures;
* ``curves/<run path, "/" -> "__">.png``  per-run training curves;
* ``.results-state.json``  cache: per-run summaries keyed by file stat, and a
  fingerprint of every figure's input data (a figure whose fingerprint is
  unchanged and whose file exists is not redrawn).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import sys
from typing import Any, Callable, Iterable

from .runio import atomic_write_bytes

# Bump STATE_VERSION when the cached summary layout changes (drops the cache), and
# STYLE_VERSION when the drawing code changes (forces every figure to be redrawn).
STATE_VERSION = 2
STYLE_VERSION = 3
STATE_NAME = ".results-state.json"

TABLE_CSV = "results.csv"
TABLE_MD = "results.md"
HEALTH_JSON = "health.json"
HEALTH_MD = "health.md"
FIG_ALPHA = "accuracy_vs_alpha.png"
FIG_BEST = "methods_at_best_alpha.png"
CURVES_DIR = "curves"
OUTPUT_FILES = (TABLE_CSV, TABLE_MD, HEALTH_JSON, HEALTH_MD, FIG_ALPHA, FIG_BEST)

CSV_COLUMNS = [
    "dataset", "teacher", "student", "role", "method", "alpha", "n_seeds", "seeds",
    "best_mean", "best_std", "last_mean", "last_std", "n_near_chance",
]

# Fallback when a run does not record num_classes (lower-cased dataset name).
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10,
               "svhn": 10, "stl10": 10, "tinyimagenet": 200, "imagenet": 1000}

# Consistent method identity across every figure: colour (Okabe-Ito, colour-blind
# safe), marker (so prints in grey still work), display name and order.
_KNOWN_METHODS = {
    "kd": ("#0072B2", "o", "KD"),
    "fitnet": ("#E69F00", "s", "FitNet"),
    "rkd": ("#009E73", "^", "RKD"),
    "ft": ("#CC79A7", "D", "FT"),
}
_ALIASES = {"hinton": "kd", "fitnets": "fitnet", "hint": "fitnet",
            "factor_transfer": "ft", "factortransfer": "ft"}
_EXTRA_COLOURS = ["#D55E00", "#56B4E9", "#8C564B", "#9467BD", "#BCBD22", "#17BECF",
                  "#7F7F7F", "#E377C2"]
_EXTRA_MARKERS = ["v", "P", "X", "h", "<", ">", "*", "p"]
TEACHER_COLOUR = "#000000"
STUDENT_COLOUR = "#7F7F7F"

RC = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.4,
    "savefig.pad_inches": 0.05,
    # A fixed title position skips matplotlib's costly automatic title placement.
    "axes.titley": 1.0, "axes.titlepad": 6.0,
}


# ----------------------------------------------------------------------------- util

def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def atomic_write_text(path: str, text: str, only_if_changed: bool = True) -> bool:
    """Write text atomically; leave the file (and its mtime) alone if unchanged."""
    data = text.encode("utf-8")
    if only_if_changed:
        try:
            with open(path, "rb") as fh:
                if fh.read() == data:
                    return False
        except OSError:
            pass
    atomic_write_bytes(path, data)
    return True


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _fingerprint(obj: Any) -> str:
    return _digest(json.dumps(obj, sort_keys=True, default=str, allow_nan=True).encode())


def _num(x: Any) -> float:
    """JSON value -> float; None/garbage/inf -> nan (plots show a gap)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _series(values: Any) -> list[float]:
    if not isinstance(values, list):
        return []
    return [_num(v) for v in values]


def fmt_alpha(alpha: Any) -> str:
    """Alpha the way the run directories spell it (``format(alpha, "g")``)."""
    if alpha is None or alpha == "":
        return ""
    try:
        return format(float(alpha), "g")
    except (TypeError, ValueError):
        return str(alpha)


def canonical_method(method: Any) -> str:
    m = str(method or "").strip().lower()
    return _ALIASES.get(m, m)


def method_sort_key(method: str) -> tuple:
    order = list(_KNOWN_METHODS)
    m = canonical_method(method)
    return (order.index(m), "") if m in order else (len(order), m)


def method_label(method: str) -> str:
    m = canonical_method(method)
    return _KNOWN_METHODS[m][2] if m in _KNOWN_METHODS else method


class MethodStyle:
    """Colour/marker per method, identical in every figure of one invocation."""

    def __init__(self, methods: Iterable[str]):
        self._style: dict[str, tuple[str, str]] = {}
        unknown = sorted({canonical_method(m) for m in methods} - set(_KNOWN_METHODS))
        for i, m in enumerate(unknown):
            self._style[m] = (_EXTRA_COLOURS[i % len(_EXTRA_COLOURS)],
                              _EXTRA_MARKERS[i % len(_EXTRA_MARKERS)])
        for m, (c, mk, _) in _KNOWN_METHODS.items():
            self._style[m] = (c, mk)

    def colour(self, method: str) -> str:
        return self._style.get(canonical_method(method), ("#333333", "o"))[0]

    def marker(self, method: str) -> str:
        return self._style.get(canonical_method(method), ("#333333", "o"))[1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); std is nan for fewer than 2 values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))


# ------------------------------------------------------------------------ discovery

def parse_run_path(rel: str) -> dict:
    """Identity of a run from its path relative to the experiments directory."""
    parts = rel.split("/")
    out: dict[str, Any] = {}
    if len(parts) == 4 and parts[1] == "teachers":
        out = {"kind": "teacher", "dataset": parts[0], "model": parts[2], "seed": parts[3]}
    elif len(parts) == 4 and parts[1] == "none":
        out = {"kind": "student", "dataset": parts[0], "method": "none", "model": parts[2],
               "seed": parts[3]}
    elif len(parts) == 5 and parts[2].startswith(("alpha_", "additive_")) and "_to_" in parts[3]:
        teacher, student = parts[3].split("_to_", 1)
        # An additive recipe has no alpha: its directory name stands in the alpha column.
        alpha = parts[2][len("alpha_"):] if parts[2].startswith("alpha_") else parts[2]
        out = {"kind": "distill", "dataset": parts[0], "method": parts[1],
               "alpha": alpha, "teacher": teacher, "student": student,
               "seed": parts[4]}
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
    if kind == "teacher":
        model = run.get("student") or run.get("teacher") or guess.get("model")
        teacher, student, method, alpha = model, None, None, None
    elif kind == "student":
        model = run.get("student") or guess.get("model")
        teacher, student, method, alpha = None, model, "none", None
    else:
        teacher = run.get("teacher") or guess.get("teacher")
        student = run.get("student") or guess.get("student")
        method = run.get("method") or guess.get("method")
        alpha = run["recipe"] if run.get("loss_form") == "additive" else run.get("alpha", guess.get("alpha"))
    seed = run.get("seed", guess.get("seed"))
    hist = data.get("history") if isinstance(data.get("history"), dict) else {}
    series = _series(hist.get("test_acc"))
    test_acc = [v for v in series if not math.isnan(v)]
    best = _num(data.get("best_acc"))
    if math.isnan(best) and test_acc:
        best = max(test_acc)
    # The best epoch, 1-based, from the history itself (writers differ on whether
    # best_epoch counts from 0 or 1); the file's own value only without a history.
    best_epoch = data.get("best_epoch")
    if test_acc and not math.isnan(best):
        hits = [i for i, v in enumerate(series) if abs(v - best) <= 1e-9 * max(1.0, abs(best))]
        best_epoch = hits[0] + 1 if hits else None
    last = _num(data.get("last_acc"))
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
    num_classes = run.get("num_classes") or config.get("num_classes")
    if not num_classes and dataset:
        num_classes = NUM_CLASSES.get(str(dataset).lower().replace("-", "").replace("_", ""))
    epochs_done = data.get("epochs_done")
    if epochs_done is None:
        epochs_done = len(_series(hist.get("test_acc")))
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    return {
        "rel": rel, "file": filename, "state": state, "status": status,
        "error": data.get("error"), "kind": kind, "dataset": dataset, "method": method,
        "alpha": fmt_alpha(alpha), "teacher": teacher, "student": student, "seed": seed,
        "num_classes": num_classes, "method_version": data.get("method_version"),
        "epochs_planned": data.get("epochs_planned"), "epochs_done": epochs_done,
        "best_acc": None if math.isnan(best) else best,
        "last_acc": None if math.isnan(last) else last,
        "best_epoch": best_epoch, "teacher_acc": data.get("teacher_acc"),
        # Teachers and plain students are trained with method "none": its version counts.
        "version_method": run.get("method") or (method if kind == "distill" else "none"),
        "started": prov.get("started"), "finished": prov.get("finished"),
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
                summary.update({k: v for k, v in parse_run_path(rel).items()})
            entry = {"file": name, "mtime_ns": st.st_mtime_ns, "size": st.st_size,
                     "digest": _digest(raw), "summary": summary}
            new_cache[rel] = entry
            summary = dict(summary)
        summary["mtime"] = st.st_mtime
        summary["digest"] = entry["digest"]
        summaries.append(summary)
    return summaries, new_cache, parsed


# ------------------------------------------------------------------ table & health

def _chance(s: dict) -> float | None:
    try:
        n = int(s.get("num_classes") or 0)
    except (TypeError, ValueError):
        return None
    return 100.0 / n if n > 0 else None


def is_near_chance(s: dict, margin: float) -> bool:
    chance = _chance(s)
    return (chance is not None and s.get("best_acc") is not None
            and s["best_acc"] <= chance + margin)


def outdated_version(s: dict, method_versions: dict | None) -> int | None:
    """The current version if this run was made with an older one, else None."""
    if not method_versions or s.get("state") == "unreadable":
        return None
    method = s.get("version_method") or s.get("method")
    current = method_versions.get(method, method_versions.get(canonical_method(method)))
    if current is None:
        return None
    have = s.get("method_version")
    try:
        if have is not None and int(have) >= int(current):
            return None
    except (TypeError, ValueError):
        pass
    return current


def _group_rows(group: list[dict], margin: float) -> dict:
    best_mean, best_std = mean_std([s["best_acc"] for s in group if s.get("best_acc") is not None])
    last_mean, last_std = mean_std([s["last_acc"] for s in group if s.get("last_acc") is not None])
    seeds = sorted((s.get("seed") for s in group), key=lambda x: (str(type(x)), x))
    return {"n_seeds": len(group), "seeds": " ".join(str(x) for x in seeds),
            "best_mean": best_mean, "best_std": best_std,
            "last_mean": last_mean, "last_std": last_std,
            "n_near_chance": sum(is_near_chance(s, margin) for s in group)}


def build_table(summaries: list[dict], chance_margin: float = 5.0,
                method_versions: dict | None = None,
                include_outdated: bool = False) -> list[dict]:
    """Rows: per dataset and teacher/student pair, the teacher, the plain student,
    then each method and alpha (CRD-paper order). Complete runs only; runs made
    with an outdated method version are left out unless ``include_outdated``."""
    done = [s for s in summaries if s.get("state") == "complete"]
    if not include_outdated:
        done = [s for s in done if outdated_version(s, method_versions) is None]
    teachers: dict[tuple, list] = {}
    students: dict[tuple, list] = {}
    distill: dict[tuple, list] = {}
    for s in done:
        ds = str(s.get("dataset") or "")
        if s.get("kind") == "teacher":
            teachers.setdefault((ds, s.get("teacher") or ""), []).append(s)
        elif s.get("kind") == "student":
            students.setdefault((ds, s.get("student") or ""), []).append(s)
        elif s.get("kind") == "distill":
            key = (ds, s.get("teacher") or "", s.get("student") or "",
                   str(s.get("method") or ""), s.get("alpha") or "")
            distill.setdefault(key, []).append(s)
    pairs = {(k[0], k[1], k[2]) for k in distill}
    used_t = {(d, t) for d, t, _ in pairs}
    used_s = {(d, st) for d, _, st in pairs}
    pairs |= {(d, t, "") for d, t in teachers if (d, t) not in used_t}
    pairs |= {(d, "", st) for d, st in students if (d, st) not in used_s}

    def alpha_key(a: str):
        try:
            return (0, float(a), a)
        except ValueError:
            return (1, 0.0, a)

    rows: list[dict] = []
    for ds, t, st in sorted(pairs):
        base = {"dataset": ds, "teacher": t, "student": st}
        if t and (ds, t) in teachers:
            rows.append({**base, "role": "teacher", "method": "", "alpha": "",
                         **_group_rows(teachers[(ds, t)], chance_margin)})
        if st and (ds, st) in students:
            rows.append({**base, "role": "student", "method": "none", "alpha": "",
                         **_group_rows(students[(ds, st)], chance_margin)})
        keys = [k for k in distill if k[:3] == (ds, t, st)]
        for k in sorted(keys, key=lambda k: (method_sort_key(k[3]), alpha_key(k[4]))):
            rows.append({**base, "role": "distill", "method": k[3], "alpha": k[4],
                         **_group_rows(distill[k], chance_margin)})
    return rows


def _csv_num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(round(float(x), 6))


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (_csv_num(r[k]) if k.endswith(("_mean", "_std")) else r[k])
                    for k in CSV_COLUMNS})
    return buf.getvalue()


def fmt_pm(mean: float, std: float, digits: int = 2) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def best_alpha_rows(rows: list[dict], metric: str = "best") -> dict[tuple, dict]:
    """For each (dataset, teacher, student, method): the row of the best alpha
    (highest mean ``metric`` accuracy; ties go to the smaller alpha)."""
    out: dict[tuple, dict] = {}
    col = f"{metric}_mean"
    for r in rows:
        if r["role"] != "distill" or not math.isfinite(r[col]):
            continue
        k = (r["dataset"], r["teacher"], r["student"], r["method"])
        if k not in out or r[col] > out[k][col]:
            out[k] = r
    return out


def table_markdown(rows: list[dict], metric: str = "best", notes: list[str] | None = None) -> str:
    lines = ["# Results", ""]
    lines.append("Test accuracy in percent: mean ± sample standard deviation (ddof = 1) over "
                 "seeds; a single seed shows its value without ±. *Best* is the best epoch's "
                 "accuracy, *last* the final epoch's (the CRD paper reports the last epoch). "
                 "Complete runs only.")
    for n in notes or []:
        lines.append("")
        lines.append(n)
    if not rows:
        lines += ["", "_No completed runs yet._", ""]
        return "\n".join(lines)
    # Summary in the layout of the CRD paper's Table 1.
    best = best_alpha_rows(rows, metric)
    methods = sorted({r["method"] for r in rows if r["role"] == "distill"}, key=method_sort_key)
    lines += ["", f"## Summary: each method at its best α ({metric}-epoch accuracy)", ""]
    head = ["Dataset", "Teacher → Student", "Teacher", "Student"] + [method_label(m) for m in methods]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    pairs = []
    for r in rows:
        p = (r["dataset"], r["teacher"], r["student"])
        if p not in pairs:
            pairs.append(p)
    col = (f"{metric}_mean", f"{metric}_std")
    for p in pairs:
        ds, t, st = p
        cells = [ds, f"{t or '–'} → {st or '–'}"]
        for role in ("teacher", "student"):
            r = next((r for r in rows if (r["dataset"], r["teacher"], r["student"]) == p
                      and r["role"] == role), None)
            cells.append(fmt_pm(r[col[0]], r[col[1]]) if r else "–")
        for m in methods:
            r = best.get((*p, m))
            cells.append(f"{fmt_pm(r[col[0]], r[col[1]])} (α {r['alpha']})" if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Choosing α by test accuracy flatters the methods; report it as such.", ""]
    # Full table.
    lines += ["## All runs", ""]
    for ds in sorted({r["dataset"] for r in rows}):
        lines += [f"### {ds}", ""]
        lines.append("| Teacher → Student | Method | α | Best acc. (%) | Last acc. (%) | Seeds |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for r in rows:
            if r["dataset"] != ds:
                continue
            pair = f"{r['teacher'] or '–'} → {r['student'] or '–'}"
            if r["role"] == "teacher":
                name = f"Teacher ({r['teacher']})"
            elif r["role"] == "student":
                name = f"Student ({r['student']}, no distillation)"
            else:
                name = method_label(r["method"])
            flag = f" ⚠ {r['n_near_chance']} near chance" if r["n_near_chance"] else ""
            lines.append(f"| {pair} | {name} | {r['alpha'] or '–'} | "
                         f"{fmt_pm(r['best_mean'], r['best_std'])} | "
                         f"{fmt_pm(r['last_mean'], r['last_std'])} | {r['n_seeds']}{flag} |")
        lines.append("")
    return "\n".join(lines)


def build_health(summaries: list[dict], chance_margin: float = 5.0,
                 method_versions: dict | None = None) -> dict:
    incomplete, failed, near, outdated, unreadable = [], [], [], [], []
    for s in summaries:
        rel, state = s["rel"], s.get("state")
        if state == "unreadable":
            unreadable.append({"run": rel, "error": s.get("error")})
            continue
        if state == "failed":
            failed.append({"run": rel, "error": s.get("error"),
                           "epochs_done": s.get("epochs_done"),
                           "epochs_planned": s.get("epochs_planned")})
        elif state in ("running", "finishing"):
            incomplete.append({
                "run": rel, "status": state, "epochs_done": s.get("epochs_done"),
                "epochs_planned": s.get("epochs_planned"), "best_acc": s.get("best_acc"),
                "last_update": _dt.datetime.fromtimestamp(s["mtime"]).astimezone()
                .isoformat(timespec="seconds") if s.get("mtime") else None})
        if state == "complete" and is_near_chance(s, chance_margin):
            near.append({"run": rel, "best_acc": s["best_acc"], "chance": _chance(s),
                         "num_classes": s.get("num_classes")})
        cur = outdated_version(s, method_versions)
        if cur is not None:
            outdated.append({"run": rel, "method": s.get("version_method") or s.get("method"),
                             "method_version": s.get("method_version"),
                             "current_version": cur, "state": state})
    return {
        "generated": _now(), "chance_margin": chance_margin,
        "method_versions": method_versions,
        "counts": {"runs": len(summaries),
                   "complete": sum(s.get("state") == "complete" for s in summaries),
                   "incomplete": len(incomplete), "failed": len(failed),
                   "near_chance": len(near), "outdated": len(outdated),
                   "unreadable": len(unreadable)},
        "incomplete": incomplete, "failed": failed, "near_chance": near,
        "outdated": outdated, "unreadable": unreadable,
    }


def health_markdown(h: dict, experiments: str) -> str:
    c = h["counts"]
    lines = ["# Run health", "",
             f"Generated {h['generated']} from `{experiments}`: {c['runs']} runs, "
             f"{c['complete']} complete.", ""]

    def section(title: str, entries: list, fmt: Callable[[dict], str], empty: str = "None."):
        lines.extend([f"## {title} ({len(entries)})", ""])
        lines.extend([f"- {fmt(e)}" for e in entries] or [empty])
        lines.append("")

    def epochs(e):
        return f"{e.get('epochs_done')}/{e.get('epochs_planned') or '?'} epochs"

    section("Incomplete (running, or progress file only)", h["incomplete"],
            lambda e: f"`{e['run']}`: {e['status']}, {epochs(e)}"
            + (f", best so far {e['best_acc']:.2f}%" if e.get("best_acc") is not None else "")
            + f", last update {e['last_update']}")
    section("Stopped by the training-health guard (status failed)", h["failed"],
            lambda e: f"`{e['run']}` after {epochs(e)}: {e.get('error') or '(no message)'}")
    section(f"Near chance (best accuracy within {h['chance_margin']:g} points of 100/classes)",
            h["near_chance"],
            lambda e: f"`{e['run']}`: best {e['best_acc']:.2f}% vs. chance {e['chance']:.2f}%")
    if h["method_versions"]:
        section("Outdated method version", h["outdated"],
                lambda e: f"`{e['run']}`: {e['method']} version {e['method_version']}, "
                f"current {e['current_version']} ({e['state']})")
    else:
        section("Outdated method version", [], str,
                "Not checked: no `--method-versions` given.")
    section("Unreadable run files", h["unreadable"], lambda e: f"`{e['run']}`: {e['error']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    # matplotlib.figure.Figure directly: no pyplot, no GUI backend, no global state.
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def _save(fig, path: str, dpi: int, fast: bool = False) -> None:
    buf = io.BytesIO()
    if fast:  # per-run curves: fixed layout, one draw, light compression
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches=None,
                    pil_kwargs={"compress_level": 1})
    else:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _rc():
    import matplotlib
    return matplotlib.rc_context(RC)


def _log_axis(ax) -> None:
    """Log y axis with plain labels (0.05, not 5x10^-2): readable, and no mathtext."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _placeholder(path: str, title: str, dpi: int) -> None:
    with _rc():
        fig = _figure(6, 3)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_title(title)
        ax.text(0.5, 0.5, "No completed runs yet", ha="center", va="center", fontsize=12,
                transform=ax.transAxes, color="#555555")
        _save(fig, path, dpi)


def aggregate_data(rows: list[dict], metric: str = "best") -> list[dict]:
    """Per (dataset, pair) panel: what both aggregate figures plot (JSON-able)."""
    panels: dict[tuple, dict] = {}
    m, sd = f"{metric}_mean", f"{metric}_std"

    def f(x):
        return x if (x is not None and math.isfinite(x)) else None

    for r in rows:
        key = (r["dataset"], r["teacher"], r["student"])
        p = panels.setdefault(key, {"dataset": key[0], "teacher": key[1], "student": key[2],
                                    "teacher_acc": None, "student_acc": None, "methods": {}})
        point = {"mean": f(r[m]), "std": f(r[sd]), "n": r["n_seeds"]}
        if r["role"] == "teacher":
            p["teacher_acc"] = point
        elif r["role"] == "student":
            p["student_acc"] = point
        elif point["mean"] is not None and r["alpha"].replace(".", "", 1).isdigit():  # alpha figures: convex runs
            p["methods"].setdefault(r["method"], []).append({"alpha": r["alpha"], **point})
    return [p for p in panels.values() if p["methods"]]


def _grid(n: int, ncols_max: int = 3) -> tuple[int, int]:
    ncols = min(ncols_max, max(1, n))
    return (n + ncols - 1) // ncols, ncols


def _metric_words(metric: str) -> str:
    return "best epoch" if metric == "best" else "last epoch"


def draw_accuracy_vs_alpha(panels: list[dict], path: str, dpi: int, metric: str,
                           style: MethodStyle) -> None:
    title = f"Test accuracy vs. α ({_metric_words(metric)}; mean ± 1 s.d. over seeds)"
    if not panels:
        _placeholder(path, title, dpi)
        return
    from matplotlib.lines import Line2D
    nrows, ncols = _grid(len(panels))
    with _rc():
        fig = _figure(4.2 * ncols, 3.3 * nrows + 0.6)
        handles: dict[str, Any] = {}
        for i, p in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            alphas_all = set()
            for method in sorted(p["methods"], key=method_sort_key):
                pts = sorted(p["methods"][method], key=lambda q: float(q["alpha"]))
                xs = [float(q["alpha"]) for q in pts]
                ys = [q["mean"] for q in pts]
                es = [q["std"] if q["std"] is not None else 0.0 for q in pts]
                alphas_all.update(xs)
                c = style.colour(method)
                h = ax.errorbar(xs, ys, yerr=es, color=c, marker=style.marker(method),
                                markersize=4.5, capsize=2.5, elinewidth=0.9,
                                label=method_label(method))
                lo = [y - e for y, e in zip(ys, es)]
                hi = [y + e for y, e in zip(ys, es)]
                ax.fill_between(xs, lo, hi, color=c, alpha=0.12, linewidth=0)
                handles.setdefault(method_label(method), h)
            for ref, colour, ls, label in (
                    (p["teacher_acc"], TEACHER_COLOUR, "--", "Teacher"),
                    (p["student_acc"], STUDENT_COLOUR, ":", "Student (no KD)")):
                if ref and ref["mean"] is not None:
                    ax.axhline(ref["mean"], color=colour, ls=ls, lw=1.2)
                    if ref["std"]:
                        ax.axhspan(ref["mean"] - ref["std"], ref["mean"] + ref["std"],
                                   color=colour, alpha=0.07, linewidth=0)
                    handles.setdefault(label, Line2D([], [], color=colour, ls=ls, lw=1.2))
            ticks = sorted(alphas_all)
            ax.set_xticks(ticks)
            ax.set_xticklabels([format(a, "g") for a in ticks])
            if ticks:
                pad = max(0.03, 0.05 * (ticks[-1] - ticks[0]))
                ax.set_xlim(ticks[0] - pad, ticks[-1] + pad)
            ax.set_xlabel("α (weight of the distillation loss)")
            ax.set_ylabel("Test accuracy (%)")
            ax.set_title(f"{p['dataset']}: {p['teacher'] or '?'} → {p['student'] or '?'}")
        fig.suptitle(title)
        fig.tight_layout()
        # Below the panels (outside the figure box; the tight bbox at save takes it in).
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center",
                   ncol=min(len(handles), 3 * ncols), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        _save(fig, path, dpi)


def draw_methods_at_best_alpha(panels: list[dict], path: str, dpi: int, metric: str,
                               style: MethodStyle) -> None:
    title = f"Each method at its best α ({_metric_words(metric)}; mean ± 1 s.d. over seeds)"
    if not panels:
        _placeholder(path, title, dpi)
        return
    nrows, ncols = _grid(len(panels))
    with _rc():
        fig = _figure(max(4.2, 0.9 * (2 + max(len(p["methods"]) for p in panels)) + 1.2) * ncols,
                      3.4 * nrows)
        for i, p in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            bars = []  # (label, mean, std, colour, annotation)
            if p["student_acc"] and p["student_acc"]["mean"] is not None:
                bars.append(("Student", p["student_acc"]["mean"], p["student_acc"]["std"],
                             STUDENT_COLOUR, ""))
            for method in sorted(p["methods"], key=method_sort_key):
                best = max(p["methods"][method], key=lambda q: (q["mean"], -float(q["alpha"])))
                bars.append((method_label(method), best["mean"], best["std"],
                             style.colour(method), f"α={best['alpha']}"))
            if p["teacher_acc"] and p["teacher_acc"]["mean"] is not None:
                bars.append(("Teacher", p["teacher_acc"]["mean"], p["teacher_acc"]["std"],
                             TEACHER_COLOUR, ""))
            xs = list(range(len(bars)))
            means = [b[1] for b in bars]
            errs = [b[2] or 0.0 for b in bars]
            ax.bar(xs, means, yerr=errs, color=[b[3] for b in bars], capsize=3,
                   width=0.7, error_kw={"elinewidth": 0.9})
            lo = min(m - e for m, e in zip(means, errs))
            hi = max(m + e for m, e in zip(means, errs))
            span = max(hi - lo, 1.0)
            ymin = max(0.0, float(math.floor(lo - 0.35 * span)))
            ax.set_ylim(ymin, hi + 0.25 * span)
            for x, (label, mean, std, colour, note) in zip(xs, bars):
                text = f"{mean:.1f}" + (f"\n{note}" if note else "")
                ax.text(x, mean + (std or 0.0) + 0.02 * span, text, ha="center",
                        va="bottom", fontsize=7)
            ax.set_xticks(xs)
            ax.set_xticklabels([b[0] for b in bars], rotation=0)
            # Bars do not start at 0 when the differences are small: the label says so.
            ax.set_ylabel("Test accuracy (%)" if ymin <= 0 else
                          f"Test accuracy (%; axis starts at {ymin:.3g})")
            ax.set_title(f"{p['dataset']}: {p['teacher'] or '?'} → {p['student'] or '?'}")
            ax.grid(axis="x", visible=False)
        fig.suptitle(title)
        fig.tight_layout()
        _save(fig, path, dpi)


def _run_title(s: dict) -> str:
    if s.get("kind") == "teacher":
        what = f"teacher {s.get('teacher')}"
    elif s.get("kind") == "student":
        what = f"student {s.get('student')} (no KD)"
    else:
        what = (f"{method_label(s.get('method') or '?')} α={s.get('alpha')}: "
                f"{s.get('teacher')} → {s.get('student')}")
    status = s.get("state")
    if s.get("best_acc") is not None:
        status += f", best {s['best_acc']:.2f}%"
        if s.get("best_epoch") is not None:
            status += f" (epoch {s['best_epoch']})"
    return f"{s.get('dataset')} · {what} · seed {s.get('seed')} — {status}"


def draw_curves(data: dict, s: dict, path: str, dpi: int) -> None:
    """Loss terms, train/test accuracy, learning rate and step health of one run."""
    hist = data.get("history") if isinstance(data.get("history"), dict) else {}
    n = max([len(v) for v in hist.values() if isinstance(v, list)] + [0])
    with _rc():
        fig = _figure(10, 6.6)
        axes = fig.subplots(2, 2)
        ax_loss, ax_acc, ax_lr, ax_hlth = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]

        nonfinite_notes: list[str] = []

        def plot(ax, key_or_values, label, **kw):
            raw = (hist.get(key_or_values) if isinstance(key_or_values, str)
                   else key_or_values)
            ys = _series(raw)
            # null is "not measured"; NaN/inf in the file is a symptom worth showing.
            bad = sum(1 for r, y in zip(raw or [], ys) if r is not None and math.isnan(y))
            if bad:
                nonfinite_notes.append(f"{label}: {bad} epoch{'s' if bad > 1 else ''}")
            if ys and not all(math.isnan(y) for y in ys):
                ax.plot(range(1, len(ys) + 1), ys, label=label, **kw)
                return ys
            return []

        loss_vals = []
        loss_vals += plot(ax_loss, "train_loss", "train loss (total)", color="#0072B2", lw=1.8)
        loss_vals += plot(ax_loss, "test_loss", "test loss", color="#D55E00", lw=1.8)
        terms = hist.get("terms") if isinstance(hist.get("terms"), dict) else {}
        for i, (name, vals) in enumerate(sorted(terms.items())):
            loss_vals += plot(ax_loss, vals, f"term: {name}", lw=1.0, ls="--",
                              color=_EXTRA_COLOURS[(i + 2) % len(_EXTRA_COLOURS)])
        finite = [v for v in loss_vals if not math.isnan(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
            _log_axis(ax_loss)
        if nonfinite_notes:
            ax_loss.text(0.01, 0.01, "non-finite values (not drawn): "
                         + "; ".join(nonfinite_notes), transform=ax_loss.transAxes,
                         color="#C00000", fontsize=7, ha="left", va="bottom", wrap=True)
        ax_loss.set_title("Loss terms")
        ax_loss.set_ylabel("loss (per-sample mean)")

        plot(ax_acc, "train_acc", "train", color="#0072B2")
        plot(ax_acc, "test_acc", "test", color="#D55E00")
        chance = _chance(s)
        if chance is not None:
            ax_acc.axhline(chance, color="#999999", ls=":", lw=1, label=f"chance ({chance:.3g}%)")
        if s.get("teacher_acc") is not None:
            ax_acc.axhline(_num(s["teacher_acc"]), color=TEACHER_COLOUR, ls="--", lw=1,
                           label="teacher")
        if s.get("best_acc") is not None and s.get("best_epoch") is not None:
            ax_acc.plot([s["best_epoch"]], [s["best_acc"]], marker="*", color="#D55E00",
                        markersize=9, ls="none", label=f"best {s['best_acc']:.2f}%")
        ax_acc.set_title("Accuracy")
        ax_acc.set_ylabel("accuracy (%)")

        lr = plot(ax_lr, "lr", "learning rate", color="#009E73")
        lr_ok = [v for v in lr if not math.isnan(v)]
        if lr_ok and min(lr_ok) > 0 and max(lr_ok) / min(lr_ok) >= 10:
            _log_axis(ax_lr)
            levels = sorted({float(f"{v:.6g}") for v in lr if not math.isnan(v)})
            if len(levels) <= 6:  # a step schedule: label exactly its values
                ax_lr.set_yticks(levels)
                ax_lr.set_yticks([], minor=True)
        ax_lr.set_title("Learning rate")
        ax_lr.set_ylabel("learning rate")

        plot(ax_hlth, "grad_share", "gradient share of the method's loss",
                     color="#CC79A7")
        ax_hlth.set_ylabel("gradient share (0–1)")
        ax_hlth.set_ylim(-0.02, 1.02)
        ax2 = ax_hlth.twinx()
        skipped = _series(hist.get("skipped_steps"))
        nonfinite = _series(hist.get("nonfinite_losses"))
        if skipped:
            ax2.plot(range(1, len(skipped) + 1), skipped, color="#D55E00", lw=1,
                     label="skipped optimizer steps")
        if nonfinite:
            ax2.plot(range(1, len(nonfinite) + 1), nonfinite, color="#000000", lw=1, ls="--",
                     label="non-finite losses")
        ax2.set_ylabel("count per epoch")
        ax2.set_ylim(bottom=0)
        if max([v for v in skipped + nonfinite if not math.isnan(v)] + [0]) == 0:
            ax2.set_ylim(0, 1)
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        ax_hlth.set_title("Step health")
        h1, l1 = ax_hlth.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        if h1 or h2:
            ax_hlth.legend(h1 + h2, l1 + l2, loc="best")
        else:
            ax_hlth.text(0.5, 0.5, "not recorded", ha="center", va="center",
                         transform=ax_hlth.transAxes, color="#777777")

        for ax, loc in ((ax_loss, "best"), (ax_acc, "best"), (ax_lr, "upper right")):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc=loc)
        from matplotlib.ticker import MaxNLocator
        for ax in (ax_loss, ax_acc, ax_lr, ax_hlth):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=1))
            if n:
                ax.set_xlim(0.5, max(n, s.get("epochs_planned") or 0) + 0.5)
        title = _run_title(s)
        if s.get("state") == "failed" and s.get("error"):
            err = str(s["error"]).replace("\n", " ")
            title += "\n" + (err[:140] + "…" if len(err) > 140 else err)
        fig.suptitle(title, fontsize=10)
        # Fixed margins instead of tight_layout: a third of the drawing time.
        fig.subplots_adjust(left=0.08, right=0.92, bottom=0.08,
                            top=0.86 if "\n" in title else 0.89, wspace=0.28, hspace=0.38)
        _save(fig, path, dpi, fast=True)


def curve_name(rel: str) -> str:
    return rel.replace("/", "__") + ".png"


def _draw_curve_job(args: tuple[str, dict, str, int]) -> tuple[str, str | None]:
    """Worker: read the run file and draw its curves. Returns (path, error or None)."""
    run_file, summary, out_path, dpi = args
    try:
        with open(run_file, "rb") as fh:
            data = json.loads(fh.read())
        draw_curves(data, summary, out_path, dpi)
        return out_path, None
    except Exception as exc:  # one bad run must not stop the others
        return out_path, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------- main

def _default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # respects PBS/cgroup CPU sets
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def parse_method_versions(value: str | None) -> dict | None:
    """``--method-versions``: a JSON object, or the path of a JSON file holding one."""
    if value is None or value == "":
        return None
    text = value
    if not value.lstrip().startswith("{"):
        with open(value, encoding="utf-8") as fh:
            text = fh.read()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("--method-versions must be a JSON object {method: version}")
    return {str(k): int(v) for k, v in data.items()}


def _load_state(out: str) -> dict:
    try:
        with open(os.path.join(out, STATE_NAME), "rb") as fh:
            state = json.loads(fh.read())
        if state.get("version") == STATE_VERSION:
            return state
    except (OSError, ValueError, AttributeError):
        pass
    return {"version": STATE_VERSION, "runs": {}, "figures": {}}


def _save_state(out: str, runs: dict, figures: dict) -> None:
    atomic_write_text(os.path.join(out, STATE_NAME),
                      json.dumps({"version": STATE_VERSION, "runs": runs, "figures": figures},
                                 sort_keys=True, separators=(",", ":")),
                      only_if_changed=True)


def run_results(experiments: str = "experiments", out: str = "results",
                chance_margin: float = 5.0, method_versions: dict | None = None,
                curves: bool = True, jobs: int | None = None, dpi: int = 300,
                curve_dpi: int = 150, metric: str = "best", force: bool = False,
                include_outdated: bool = False,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Do everything; return a report (counts, and the figures drawn and skipped)."""
    os.makedirs(out, exist_ok=True)
    state = _load_state(out)
    report: dict[str, Any] = {"drawn": [], "skipped": [], "removed": [], "errors": []}
    if not os.path.isdir(experiments):
        log(f"kdlab results: experiments directory '{experiments}' does not exist; "
            f"writing empty results to '{out}'.")
    summaries, run_cache, parsed = load_runs(experiments, {} if force else state.get("runs"))
    report.update(runs=len(summaries), parsed=parsed)
    if not summaries and os.path.isdir(experiments):
        log(f"kdlab results: no runs (no metrics.json or progress.json) under "
            f"'{experiments}'; writing empty results to '{out}'.")

    # 1. Table and health first: fast, and useful even if drawing fails later.
    rows = build_table(summaries, chance_margin, method_versions, include_outdated)
    health = build_health(summaries, chance_margin, method_versions)
    notes = []
    n_out = sum(1 for s in summaries if s.get("state") == "complete"
                and outdated_version(s, method_versions) is not None)
    if n_out and not include_outdated:
        notes.append(f"{n_out} complete run(s) made with an outdated method version are left "
                     f"out (see health.md).")
    atomic_write_text(os.path.join(out, TABLE_CSV), table_csv(rows))
    atomic_write_text(os.path.join(out, TABLE_MD), table_markdown(rows, metric, notes))
    atomic_write_text(os.path.join(out, HEALTH_JSON),
                      json.dumps(health, indent=2, allow_nan=False, default=str) + "\n",
                      only_if_changed=False)
    atomic_write_text(os.path.join(out, HEALTH_MD), health_markdown(health, experiments),
                      only_if_changed=False)
    report.update(rows=rows, health=health)

    old_figs: dict[str, str] = {} if force else dict(state.get("figures") or {})
    figs: dict[str, str] = {}

    def needed(name: str, fp: str) -> bool:
        if old_figs.get(name) == fp and os.path.isfile(os.path.join(out, name)):
            figs[name] = fp
            report["skipped"].append(name)
            return False
        return True

    try:
        # 2. Aggregate figures.
        panels = aggregate_data(rows, metric)
        style = MethodStyle(m for p in panels for m in p["methods"])
        for name, draw in ((FIG_ALPHA, draw_accuracy_vs_alpha),
                           (FIG_BEST, draw_methods_at_best_alpha)):
            fp = _fingerprint([STYLE_VERSION, name, dpi, metric, panels])
            if needed(name, fp):
                draw(panels, os.path.join(out, name), dpi, metric, style)
                figs[name] = fp
                report["drawn"].append(name)

        # 3. Per-run curves (the expensive part), only for new or changed runs.
        if curves:
            todo = []
            for s in summaries:
                if s.get("state") == "unreadable":
                    continue
                name = f"{CURVES_DIR}/{curve_name(s['rel'])}"
                fp = _fingerprint([STYLE_VERSION, "curve", curve_dpi, s["digest"], s["file"],
                                   s.get("state")])
                if needed(name, fp):
                    run_file = os.path.join(experiments, s["rel"], s["file"])
                    todo.append((name, fp, (run_file, s, os.path.join(out, name), curve_dpi)))
            if todo:
                os.makedirs(os.path.join(out, CURVES_DIR), exist_ok=True)
            jobs = jobs or _default_jobs()
            if jobs > 1 and len(todo) >= 8:
                import concurrent.futures as cf
                import multiprocessing as mp
                with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
                    results = pool.map(_draw_curve_job, [t[2] for t in todo], chunksize=4)
                    for (name, fp, _), (_, err) in zip(todo, results):
                        _record(name, fp, err, figs, report, log)
            else:
                for name, fp, job in todo:
                    _record(name, fp, _draw_curve_job(job)[1], figs, report, log)
            # Curves of runs that no longer exist (only files this tool made).
            for name in old_figs:
                if name.startswith(CURVES_DIR + "/") and name not in figs:
                    try:
                        os.unlink(os.path.join(out, name))
                        report["removed"].append(name)
                    except FileNotFoundError:
                        pass
        else:
            figs.update({k: v for k, v in old_figs.items() if k.startswith(CURVES_DIR + "/")})
    finally:
        _save_state(out, run_cache, figs)
    c = health["counts"]
    log(f"kdlab results: {c['runs']} runs ({c['complete']} complete, {c['incomplete']} "
        f"incomplete, {c['failed']} failed, {c['near_chance']} near chance, "
        f"{c['outdated']} outdated); {len(rows)} table rows; figures drawn "
        f"{len(report['drawn'])}, unchanged {len(report['skipped'])} -> {out}/")
    return report


def _record(name, fp, err, figs, report, log) -> None:
    if err is None:
        figs[name] = fp
        report["drawn"].append(name)
    else:
        report["errors"].append(f"{name}: {err}")
        log(f"kdlab results: could not draw {name}: {err}")


def main(args: argparse.Namespace) -> int:
    try:
        versions = parse_method_versions(args.method_versions)
    except (OSError, ValueError) as exc:
        print(f"kdlab results: bad --method-versions: {exc}", file=sys.stderr)
        return 2
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    report = run_results(args.experiments, args.out, chance_margin=args.chance_margin,
                         method_versions=versions, curves=not args.no_curves, jobs=args.jobs,
                         dpi=args.dpi, curve_dpi=args.curve_dpi, metric=args.metric,
                         force=args.force, include_outdated=args.include_outdated, log=log)
    return 1 if report["errors"] else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``results`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "results", help="tables, figures and a health list from an experiments directory",
        description="Scan EXPERIMENTS for runs (metrics.json = complete, progress.json = "
                    "running/failed) and write results.csv/.md, health.json/.md, "
                    "accuracy_vs_alpha.png, methods_at_best_alpha.png and curves/*.png into "
                    "--out. Figures whose input data did not change are not redrawn.")
    p.add_argument("experiments", nargs="?", default="experiments",
                   help="experiments directory (default: %(default)s)")
    p.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    p.add_argument("--chance-margin", type=float, default=5.0, metavar="POINTS",
                   help="flag complete runs whose best accuracy is within POINTS percentage "
                        "points of chance, 100/num_classes (default: %(default)s)")
    p.add_argument("--method-versions", default=None, metavar="JSON",
                   help="current version of each method, as a JSON object "
                        "('{\"kd\": 1, \"rkd\": 2}') or a JSON file; runs made with an older "
                        "method_version are listed in the health list and left out of the table")
    p.add_argument("--include-outdated", action="store_true",
                   help="keep runs with an outdated method version in the table")
    p.add_argument("--metric", choices=("best", "last"), default="best",
                   help="accuracy used by the figures and the best-α summary (default: "
                        "%(default)s; the table always has both)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-run curve figures")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes for drawing curves (default: min(4, CPUs available))")
    p.add_argument("--dpi", type=int, default=300, help="aggregate figures (default: 300)")
    p.add_argument("--curve-dpi", type=int, default=150, help="per-run curves (default: 150)")
    p.add_argument("--force", action="store_true",
                   help="ignore the cache: re-read every run and redraw every figure")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=main)
    return p


if __name__ == "__main__":  # python -m kdlab.results ...
    _parser = argparse.ArgumentParser(prog="kdlab")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["results", *sys.argv[1:]])
    sys.exit(_args.func(_args))
