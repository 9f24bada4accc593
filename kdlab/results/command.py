"""``kdlab results``: the command, its cache and its outputs (docs/results.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable

from ..runio import atomic_write_bytes, checksummed, finite_or_null, json_intact, remove_temporaries
from .figures import (STYLE_VERSION, MethodStyle, aggregate_data, curve_name, draw_accuracy_vs_alpha,
                      draw_methods_at_best_alpha, _draw_curve_job)
from .health import build_health, health_markdown
from .registry import RegistryUnreadable, registry_versions
from .runs import digest, left_out, load_runs
from .table import build_table, not_complete_counts, registry_methods, shown_runs, table_csv, table_markdown

# Bump STATE_VERSION when the cached summary layout changes (drops the cache).
STATE_VERSION = 7
STATE_NAME = ".results-state.json"

TABLE_CSV = "results.csv"
TABLE_MD = "results.md"
HEALTH_JSON = "health.json"
HEALTH_MD = "health.md"
FIG_ALPHA = "accuracy_vs_alpha.png"
FIG_BEST = "methods_at_best_alpha.png"
CURVES_DIR = "curves"
OUTPUT_FILES = (TABLE_CSV, TABLE_MD, HEALTH_JSON, HEALTH_MD, FIG_ALPHA, FIG_BEST)


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


def fingerprint(obj: Any) -> str:
    return digest(json.dumps(obj, sort_keys=True, default=str, allow_nan=True).encode())


def _default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # respects PBS/cgroup CPU sets
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def parse_method_versions(value: str | None) -> dict | None:
    """``--method-versions``: a JSON object ``{method: positive int}``, or the path of a
    JSON file holding one. Raises OSError (unreadable file) or ValueError (bad content,
    naming the method)."""
    if value is None or value == "":
        return None
    text = value
    if not value.lstrip().startswith("{"):
        with open(value, encoding="utf-8") as fh:
            text = fh.read()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object {method: version}")
    for method, version in data.items():
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"the version of {method!r} must be a positive integer, "
                             f"not {json.dumps(version)}")
    return data


# Argument types: a bad value stops the command before any work, with an argparse
# error naming the option (exit status 2), never a traceback from deep inside.
# 600 dpi already makes the methods figure of 14 methods and 15 pairs (5 rows of 3) about
# 28000 x 10000 pixels, 1.1 GB of RGBA; 1200 would be 4.6 GB.
DPI_RANGE = (10, 600)
JOBS_RANGE = (1, 256)


def _method_versions_arg(value: str) -> dict | None:
    try:
        return parse_method_versions(value)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value!r}: {exc.strerror or exc}") \
            from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{n} is out of range: must be from {low} to {high}")
        return n
    return parse


def _chance_margin(value: str) -> float:
    """Percentage points above chance (100 / classes): 100 already flags every run."""
    try:
        margin = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(margin) and 0 <= margin <= 100):
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be a finite number "
                                         f"of percentage points from 0 to 100")
    return margin


def _not_a_directory(path: str) -> str:
    return f"{path} is a file, not a directory" if os.path.isfile(path) else \
        f"{path} is not a directory"


def experiments_directory(value: str) -> str:
    """An existing directory (an empty one gives empty results): a mistyped path must not
    replace the results in --out with empty ones."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    if not os.path.lexists(value):
        raise argparse.ArgumentTypeError(f"{value} does not exist (nothing was written)")
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(_not_a_directory(value))
    return value


def _out_dir(value: str) -> str:
    """A directory, or one that can be made: its nearest existing ancestor is a
    writable directory."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    existing = value
    while not os.path.lexists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(_not_a_directory(existing) if existing == value else
                                         f"cannot create {value}: {_not_a_directory(existing)}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {existing}")
    return value


def _load_state(out: str) -> dict:
    """The cache of the last run; an empty one where it is missing, of another version, or damaged: its cached
    summaries stand for run files whose size and mtime did not change, so a digit flipped in one of them would
    change the table unseen (it carries the checksum of the rest, as run files do)."""
    try:
        with open(os.path.join(out, STATE_NAME), "rb") as fh:
            state = json.loads(fh.read())
        if state.get("version") == STATE_VERSION and "sha256" in state and json_intact(state):
            return state
    except (OSError, ValueError, AttributeError):
        pass
    return {"version": STATE_VERSION, "runs": {}, "figures": {}}


def _save_state(out: str, runs: dict, figures: dict) -> None:
    state = checksummed(finite_or_null({"version": STATE_VERSION, "runs": runs, "figures": figures}))
    atomic_write_text(os.path.join(out, STATE_NAME),
                      json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=False), only_if_changed=True)


def run_results(experiments: str = "experiments", out: str = "results",
                chance_margin: float = 5.0, method_versions: dict | None = None,
                curves: bool = True, jobs: int | None = None, dpi: int = 300,
                curve_dpi: int = 150, metric: str = "best", force: bool = False,
                include_outdated: bool = False,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Do everything; return a report (counts, and the figures drawn and skipped)."""
    os.makedirs(out, exist_ok=True)
    for directory in (out, os.path.join(out, CURVES_DIR)):  # a kill left them; a concurrent run's are fresh
        remove_temporaries(directory, min_age_s=60)
    state = _load_state(out)
    report: dict[str, Any] = {"drawn": [], "skipped": [], "removed": [], "errors": []}
    if not os.path.isdir(experiments):
        why = "is not a directory" if os.path.lexists(experiments) else "does not exist"
        log(f"kdlab results: experiments directory '{experiments}' {why}; "
            f"writing empty results to '{out}'.")
    summaries, run_cache, parsed = load_runs(experiments, {} if force else state.get("runs"))
    report.update(runs=len(summaries), parsed=parsed)
    if not summaries and os.path.isdir(experiments):
        log(f"kdlab results: no runs (no metrics.json or progress.json) under "
            f"'{experiments}'; writing empty results to '{out}'.")

    # 1. Table and health first: fast, and useful even if drawing fails later.
    methods = registry_methods()  # the table's and the figures' methods, in registry order
    rows = build_table(summaries, chance_margin, method_versions, include_outdated, methods)
    health = build_health(summaries, chance_margin, method_versions)
    notes = []
    n_outdated = shown_runs(summaries, method_versions, include_outdated)[1]
    if n_outdated:
        notes.append(f"{n_outdated} complete run(s) made with an outdated method version are left "
                     f"out (see health.md).")
    not_shown = [f"{health['counts'][k]} {k}" for k in
                 ("incomplete", "failed", "unreadable", "misplaced", "duplicate") if health["counts"][k]]
    if not_shown:  # a row's Seeds counts only what it averages: say what else there is
        notes.append(f"Not in the table (see health.md): {', '.join(not_shown)} run file(s).")
    atomic_write_text(os.path.join(out, TABLE_CSV), table_csv(rows))
    table = table_markdown(rows, metric, notes, methods, not_complete=not_complete_counts(summaries))
    atomic_write_text(os.path.join(out, TABLE_MD), table)
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
        style = MethodStyle(methods, (m for p in panels for m in p["methods"]))
        for name, draw in ((FIG_ALPHA, draw_accuracy_vs_alpha),
                           (FIG_BEST, draw_methods_at_best_alpha)):
            fp = fingerprint([STYLE_VERSION, name, dpi, metric, panels])
            if needed(name, fp):
                draw(panels, os.path.join(out, name), dpi, metric, style)
                figs[name] = fp
                report["drawn"].append(name)

        # 3. Per-run curves (the expensive part), only for new or changed runs.
        if curves:
            todo = []
            for s in summaries:
                if s.get("state") == "unreadable" or left_out(s):
                    continue
                name = f"{CURVES_DIR}/{curve_name(s['rel'])}"
                fp = fingerprint([STYLE_VERSION, "curve", curve_dpi, s["digest"], s["file"],
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
                        _record(name, fp, err, figs, report)
            else:
                for name, fp, job in todo:
                    _record(name, fp, _draw_curve_job(job)[1], figs, report)
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
        f"{c['outdated']} outdated, {c['mixed_code']} of mixed code, {c['unreadable']} unreadable, "
        f"{c['misplaced']} misplaced, "
        f"{c['duplicate']} duplicate); {len(rows)} table rows; "
        f"figures drawn {len(report['drawn'])}, unchanged {len(report['skipped'])} -> {out}/")
    return report


def _record(name, fp, err, figs, report) -> None:
    if err is None:
        figs[name] = fp
        report["drawn"].append(name)
    else:
        report["errors"].append(f"{name}: {err}")  # printed by main, --quiet or not


def main(args: argparse.Namespace) -> int:
    versions = args.method_versions  # parsed and checked by _method_versions_arg
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    if versions is None:  # by hand: the registry's own versions, read without torch
        try:
            versions = registry_versions()
        except (OSError, SyntaxError, RegistryUnreadable) as exc:
            log(f"kdlab results: cannot read the method registry ({exc}); outdated runs are "
                f"not checked")
    try:
        report = run_results(args.experiments, args.out, chance_margin=args.chance_margin,
                             method_versions=versions, curves=not args.no_curves, jobs=args.jobs,
                             dpi=args.dpi, curve_dpi=args.curve_dpi, metric=args.metric,
                             force=args.force, include_outdated=args.include_outdated, log=log)
    except OSError as exc:  # a full disk or quota, a read-only mount: one line naming the file, as kdlab's others
        print(f"kdlab results: error: {exc}", file=sys.stderr)
        return 1
    for error in report["errors"]:  # also under --quiet: a cron log must say why it exits 1
        print(f"kdlab results: could not draw {error}", file=sys.stderr)
    return 1 if report["errors"] else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``results`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "results", help="tables, figures and a health list from an experiments directory",
        description="Scan EXPERIMENTS for runs (metrics.json = complete, progress.json = "
                    "running/failed) and write results.csv/.md, health.json/.md, "
                    "accuracy_vs_alpha.png, methods_at_best_alpha.png and curves/*.png into "
                    "--out, comparing with published numbers where a run's dataset, pair "
                    "and recipe match (kdlab/results/published.json). Figures whose input data did not change are not redrawn.")
    p.add_argument("experiments", nargs="?", default="experiments", type=experiments_directory,
                   help="experiments directory (default: %(default)s)")
    p.add_argument("--out", default="results", type=_out_dir,
                   help="output directory (default: %(default)s)")
    p.add_argument("--chance-margin", type=_chance_margin, default=5.0, metavar="POINTS",
                   help="flag complete runs whose best accuracy is within POINTS percentage "
                        "points of chance, 100/num_classes; 0 to 100 (default: %(default)s)")
    p.add_argument("--method-versions", default=None, metavar="JSON", type=_method_versions_arg,
                   help="current version of each method, as a JSON object "
                        "('{\"kd\": 1, \"rkd\": 2}') or a JSON file (default: the versions in "
                        "kdlab/methods); runs made with an older method_version are listed in "
                        "the health list and left out of the table")
    p.add_argument("--include-outdated", action="store_true",
                   help="keep runs with an outdated method version in the table")
    p.add_argument("--metric", choices=("best", "last"), default="best",
                   help="accuracy of the figures and of the summary table: best or last "
                        "epoch (default: %(default)s; the full table has both, and the "
                        "comparison with published numbers always uses the source's own)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-run curve figures")
    p.add_argument("--jobs", type=_int_in(*JOBS_RANGE), default=None,
                   help=f"processes for drawing curves, {JOBS_RANGE[0]} to {JOBS_RANGE[1]} "
                        f"(default: min(4, CPUs available))")
    p.add_argument("--dpi", type=_int_in(*DPI_RANGE), default=300,
                   help=f"aggregate figures, {DPI_RANGE[0]} to {DPI_RANGE[1]} (default: 300)")
    p.add_argument("--curve-dpi", type=_int_in(*DPI_RANGE), default=150,
                   help=f"per-run curves, {DPI_RANGE[0]} to {DPI_RANGE[1]} (default: 150)")
    p.add_argument("--force", action="store_true",
                   help="ignore the cache: re-read every run and redraw every figure")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=main)
    return p
