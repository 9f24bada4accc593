"""The results table: one row per dataset, teacher/student pair, method and loss
setting, plus a teacher and a plain-student row per pair; the Markdown summary with a
column per registered method; and the comparison with published numbers."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import Any, Iterable

from .health import is_near_chance, outdated_version
from .published import load_sources, published_value, source_of
from .registry import RegistryUnreadable, distillation_methods
from .runs import left_out, setting_label, setting_sort_key

CSV_COLUMNS = [
    "dataset", "teacher", "student", "role", "method", "setting", "alpha", "n_seeds", "seeds",
    "best_mean", "best_std", "last_mean", "last_std", "n_near_chance",
    "published_source", "published", "published_metric", "ours_minus_published", "n_recipes",
]


def registry_methods() -> list[str]:
    """The registered distillation methods, in registry order ([] if unreadable)."""
    try:
        return distillation_methods()
    except (OSError, SyntaxError, RegistryUnreadable):
        return []


def method_order(registered: list[str], found: Iterable[str] = ()) -> list[str]:
    """The registered methods in registry order, then those found only in runs, by name."""
    return list(registered) + sorted(set(found) - set(registered))


def method_sort_key(method: str, order: list[str]) -> tuple:
    return (order.index(method), "") if method in order else (len(order), method)


def shown_runs(summaries: list[dict], method_versions: dict | None = None,
               include_outdated: bool = False) -> tuple[list[dict], int]:
    """(the runs the table shows, how many it leaves out as outdated): complete runs only, never
    a misplaced or duplicate one (runs.check_placement), less those made with an outdated
    method version unless ``include_outdated``."""
    complete = [s for s in summaries if s.get("state") == "complete" and not left_out(s)]
    if include_outdated:
        return complete, 0
    current = [s for s in complete if outdated_version(s, method_versions) is None]
    return current, len(complete) - len(current)


def pair_and_method(s: dict) -> tuple:
    """(dataset, teacher, student, method) of a distilled run's summary: a column of a pair's row."""
    return (str(s.get("dataset") or ""), s.get("teacher") or "", s.get("student") or "", str(s.get("method") or ""))


def not_complete_counts(summaries: list[dict]) -> dict[tuple, int]:
    """Per (dataset, teacher, student, method): its distillation runs that are on disk but not
    complete (running, interrupted, finishing or failed): the summary's best setting is chosen
    without them."""
    return dict(Counter(pair_and_method(s) for s in summaries if s.get("kind") == "distill"
                        and s.get("state") not in ("complete", "unreadable") and not left_out(s)))


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


def _group_row(group: list[dict], margin: float, sources: tuple[dict, ...], role: str,
               teacher: str, student: str, method: str, setting: str = "") -> dict:
    best_mean, best_std = mean_std([s["best_acc"] for s in group if s.get("best_acc") is not None])
    last_mean, last_std = mean_std([s["last_acc"] for s in group if s.get("last_acc") is not None])
    seeds = sorted((s.get("seed") for s in group), key=lambda x: (str(type(x)), x))
    row = {"n_seeds": len(group), "seeds": " ".join(str(x) for x in seeds),
           "best_mean": best_mean, "best_std": best_std,
           "last_mean": last_mean, "last_std": last_std,
           "n_near_chance": sum(is_near_chance(s, margin) for s in group),
           "n_recipes": len({s.get("recipe_digest") for s in group}),
           "n_imported": sum(bool(s.get("imported_from")) for s in group),  # teachers of kdlab import-teacher
           "published_source": "", "published": math.nan, "published_metric": "",
           "ours_minus_published": math.nan}
    source = source_of(group, sources)
    if source:
        row["published_source"] = source["id"]
        value = published_value(source, role, teacher, student, method, setting)
        if value is not None:
            row.update(published=float(value), published_metric=source["metric"],
                       ours_minus_published=row[f"{source['metric']}_mean"] - float(value))
    return row


def build_table(summaries: list[dict], chance_margin: float = 5.0,
                method_versions: dict | None = None, include_outdated: bool = False,
                methods: list[str] | None = None,
                sources: tuple[dict, ...] | None = None) -> list[dict]:
    """Rows: per dataset and teacher/student pair, the teacher, the plain student, then
    each method (registry order) and setting (alphas rising, then other loss forms).
    Complete runs only; runs made with an outdated method version are left out unless
    ``include_outdated``. Rows are keyed by the runs' recorded settings: a loss form
    without an alpha is its own row, never merged with an alpha."""
    order = registry_methods() if methods is None else methods
    sources = load_sources() if sources is None else sources
    done, _ = shown_runs(summaries, method_versions, include_outdated)
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
            distill.setdefault((*pair_and_method(s), s.get("setting") or ""), []).append(s)
    pairs = {(k[0], k[1], k[2]) for k in distill}
    used_t = {(d, t) for d, t, _ in pairs}
    used_s = {(d, st) for d, _, st in pairs}
    pairs |= {(d, t, "") for d, t in teachers if (d, t) not in used_t}
    pairs |= {(d, "", st) for d, st in students if (d, st) not in used_s}

    rows: list[dict] = []
    for ds, t, st in sorted(pairs):
        base = {"dataset": ds, "teacher": t, "student": st}
        if t and (ds, t) in teachers:
            rows.append({**base, "role": "teacher", "method": "", "setting": "", "alpha": "",
                         **_group_row(teachers[(ds, t)], chance_margin, sources,
                                      "teacher", t, st, "")})
        if st and (ds, st) in students:
            rows.append({**base, "role": "student", "method": "none", "setting": "", "alpha": "",
                         **_group_row(students[(ds, st)], chance_margin, sources,
                                      "student", t, st, "none")})
        keys = [k for k in distill if k[:3] == (ds, t, st)]
        for k in sorted(keys, key=lambda k: (method_sort_key(k[3], order),
                                             setting_sort_key(k[4]))):
            group = distill[k]
            rows.append({**base, "role": "distill", "method": k[3], "setting": k[4],
                         "alpha": group[0].get("alpha") or "",
                         **_group_row(group, chance_margin, sources, "distill", t, st, k[3], k[4])})
    return rows


def _csv_num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(round(float(x), 6))


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    numeric = ("best_mean", "best_std", "last_mean", "last_std", "published",
               "ours_minus_published")
    for r in rows:
        w.writerow({k: (_csv_num(r[k]) if k in numeric else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def fmt_pm(mean: float, std: float, digits: int = 2) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_num(x: float, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.2f}".replace("-", "−") if sign else f"{x:.2f}"


def metric_words(metric: str) -> str:
    return "best-epoch" if metric == "best" else "last-epoch"


def best_setting_rows(rows: list[dict], metric: str = "best",
                      source_id: str | None = None) -> dict[tuple, dict]:
    """For each (dataset, teacher, student, method): the row of the best setting (highest
    mean ``metric`` accuracy; ties go to the first in table order); with ``source_id``,
    among the rows compared with that published source only, those with a published number
    first (CRD alone before a better CRD+KD, which the source does not report)."""
    out: dict[tuple, dict] = {}
    col = f"{metric}_mean"

    def rank(r):
        return (source_id is not None and math.isfinite(r["published"]), r[col])

    for r in rows:
        if r["role"] != "distill" or not math.isfinite(r[col]):
            continue
        if source_id is not None and r["published_source"] != source_id:
            continue
        k = (r["dataset"], r["teacher"], r["student"], r["method"])
        if k not in out or rank(r) > rank(out[k]):
            out[k] = r
    return out


def _pairs(rows: list[dict]) -> list[tuple]:
    pairs: list[tuple] = []
    for r in rows:
        p = (r["dataset"], r["teacher"], r["student"])
        if p not in pairs:
            pairs.append(p)
    return pairs


def _role_row(rows: list[dict], pair: tuple, role: str) -> dict | None:
    return next((r for r in rows if (r["dataset"], r["teacher"], r["student"]) == pair
                 and r["role"] == role), None)


def _table(head: list[str], body: list[list[str]], left: int) -> list[str]:
    def row(cells):  # a "|" from a directory name (a method, a setting) would end its cell: escaped, it stays
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return [row(head), "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"] + [row(c) for c in body]


def _comparison(rows: list[dict], methods: list[str], source: dict) -> list[str]:
    """Ours beside the source's numbers, on the source's metric, for the pairs whose runs
    recorded its recipe: each method at its best setting among those runs."""
    metric, sid = source["metric"], source["id"]
    pairs = [p for p in _pairs(rows) if any(
        r["published_source"] == sid for r in rows if (r["dataset"], r["teacher"], r["student"]) == p)]
    if not pairs:
        return []
    best = best_setting_rows(rows, metric, sid)
    col = (f"{metric}_mean", f"{metric}_std")
    head = ["Dataset", "Teacher → Student", "", "Teacher", "Student", *methods]
    body = []
    for p in pairs:
        ours, pub, diff = [p[0], f"{p[1] or '–'} → {p[2] or '–'}", "ours"], \
            ["", "", f"published ({sid})"], ["", "", "Δ ours − published"]
        cells = [_role_row(rows, p, "teacher"), _role_row(rows, p, "student")]
        cells += [best.get((*p, m)) for m in methods]
        for i, r in enumerate(cells):
            matched = r is not None and r["published_source"] == sid
            setting = f" ({setting_label(r['setting'])})" if matched and i >= 2 else ""
            ours.append(fmt_pm(r[col[0]], r[col[1]]) + setting if matched else "–")
            pub.append(fmt_num(r["published"]) if matched else "–")
            diff.append(fmt_num(r["ours_minus_published"], sign=True) if matched else "–")
        body += [ours, pub, diff]
    return ["", f"## Compared with {sid}: {metric_words(metric)} test accuracy (%), the "
            f"metric the source reports", "",
            f"Source: {source['title']}; {source['note']}. Only runs that recorded its "
            f"recipe ({', '.join(f'{k} {v}' for k, v in source['recipe'].items())}) are "
            f"compared; each method at its best setting among them (by {metric_words(metric)} "
            f"accuracy).", "", *_table(head, body, 3)]


def _mixed(row: dict) -> str:
    return " ⚠" if row["n_recipes"] > 1 else ""


def table_markdown(rows: list[dict], metric: str = "best", notes: list[str] | None = None,
                   methods: list[str] | None = None,
                   sources: tuple[dict, ...] | None = None, not_complete: dict[tuple, int] | None = None) -> str:
    order = registry_methods() if methods is None else methods
    sources = load_sources() if sources is None else sources
    lines = ["# Results", ""]
    lines.append("Test accuracy in percent: mean ± sample standard deviation (ddof = 1) over "
                 "seeds; a single seed shows its value without ±. *Best-epoch* is the best "
                 "epoch's accuracy, *last-epoch* the final epoch's; each table's title says "
                 "which it shows. Complete runs only.")
    for n in notes or []:
        lines += ["", n]
    if not rows:
        lines += ["", "_No completed runs yet._", ""]
        return "\n".join(lines)
    # A column per registered method, then any method found in runs but not registered.
    methods = method_order(order, (r["method"] for r in rows if r["role"] == "distill"))
    best = best_setting_rows(rows, metric)
    col = (f"{metric}_mean", f"{metric}_std")
    most_seeds: dict[tuple, int] = {}  # per pair and method, over its settings
    for r in rows:
        if r["role"] == "distill":
            k = (r["dataset"], r["teacher"], r["student"], r["method"])
            most_seeds[k] = max(most_seeds.get(k, 0), r["n_seeds"])

    def seeds(r):  # a best setting on fewer seeds than the method's other settings may have won on luck: say so
        n, most = r["n_seeds"], most_seeds[(r["dataset"], r["teacher"], r["student"], r["method"])]
        return f", {n} seed{'s' * (n != 1)}" if n < most else ""

    body = []
    for p in _pairs(rows):
        cells = [p[0], f"{p[1] or '–'} → {p[2] or '–'}"]
        for role in ("teacher", "student"):
            r = _role_row(rows, p, role)
            cells.append(fmt_pm(r[col[0]], r[col[1]]) + _mixed(r) if r else "–")
        for m in methods:
            r, n = best.get((*p, m)), (not_complete or {}).get((*p, m), 0)
            pending = f"{n} run{'s' * (n != 1)} not complete" if n else ""
            if r:
                cells.append(f"{fmt_pm(r[col[0]], r[col[1]])} ({setting_label(r['setting'])}{seeds(r)}"
                             f"{'; ' * bool(pending)}{pending}){_mixed(r)}")
            else:
                cells.append(f"– ({pending})" if pending else "–")
        body.append(cells)
    lines += ["", f"## Summary: each method at its best setting, {metric_words(metric)} test "
              f"accuracy (%)", "",
              *_table(["Dataset", "Teacher → Student", "Teacher", "Student", *methods], body, 2),
              "", "Choosing the setting by test accuracy flatters the methods; report it as "
              "such. A method without runs shows –; a best setting with fewer seeds than the "
              "method's other settings says how many; a method with runs not complete (unfinished "
              "or failed: health.md) says how many, as its best setting may still change; ⚠ marks "
              "a mean over runs of different recipes (see *All runs*)."]
    for source in sources:
        lines += _comparison(rows, methods, source)
    lines += ["", "## All runs", "",
              "Best-epoch and last-epoch accuracy side by side; *Published* is the source's "
              "number on its own metric (column *Metric*), and Δ is ours on that metric minus "
              "it. *⚠ N recipes*: the row's runs recorded N different training recipes or method "
              "settings (epochs, lr and schedule, batch, weight decay, label smoothing, precision, "
              "the method's settings), so its mean mixes them.", ""]
    for ds in sorted({r["dataset"] for r in rows}):
        lines += [f"### {ds}", ""]
        body = []
        for r in rows:
            if r["dataset"] != ds:
                continue
            if r["role"] == "teacher":
                imported = ("" if not r["n_imported"] else ", imported" if r["n_imported"] == r["n_seeds"]
                            else f", {r['n_imported']} of {r['n_seeds']} imported")
                name = f"Teacher ({r['teacher']}{imported})"
            elif r["role"] == "student":
                name = f"Student ({r['student']}, no distillation)"
            else:
                name = r["method"]
            flag = f" ⚠ {r['n_near_chance']} near chance" if r["n_near_chance"] else ""
            if r["n_recipes"] > 1:
                flag += f" ⚠ {r['n_recipes']} recipes"
            body.append([f"{r['teacher'] or '–'} → {r['student'] or '–'}", name,
                         setting_label(r["setting"]) if r["setting"] else "–",
                         fmt_pm(r["best_mean"], r["best_std"]),
                         fmt_pm(r["last_mean"], r["last_std"]),
                         fmt_num(r["published"]), r["published_metric"] or "–",
                         fmt_num(r["ours_minus_published"], sign=True),
                         f"{r['n_seeds']}{flag}"])
        lines += _table(["Teacher → Student", "Method", "Setting", "Best-epoch acc. (%)",
                         "Last-epoch acc. (%)", "Published (%)", "Metric", "Δ", "Seeds"],
                        body, 3)
        lines.append("")
    return "\n".join(lines)
