"""Benchmark of ``kdlab results`` on 1,000 fabricated runs (240 epochs each).

Run: ``.venv/bin/python bench/bench_results.py [--runs 1000] [--epochs 240]
[--curve-runs 24] [--jobs N] [--keep DIR]``

Prints, from the same process and the same files, side by side:

* a naive baseline: walk the tree, ``json.load`` every run file, group, mean and
  ``statistics.stdev``, write a CSV (what a first script would do, every time);
* the project's table from scratch (parse every file; no cache);
* the whole command cold (table, health and both aggregate figures, no curves);
* the whole command re-run on unchanged inputs (stat cache, figures skipped), and
  with one run changed;
* per-run curves on a sample (first draw, then an unchanged re-run), since drawing
  1,000 curves from scratch takes minutes and is done once per run, not per call.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdlab import results as R  # noqa: E402
from kdlab.runio import atomic_write_json  # noqa: E402

PAIRS = [("ResNet56", "ResNet20"), ("ResNet110", "ResNet20"), ("ResNet110", "ResNet32"),
         ("ResNet110", "ResNet56")]
METHODS = ["kd", "fitnets", "rkd", "ft"]
ALPHAS = [0.1, 0.3, 0.5, 0.75, 0.95]


def fabricate(root: Path, n_runs: int, epochs: int, seed: int = 0) -> int:
    """Write ``n_runs`` run directories (metrics.json + progress.json). Returns bytes."""
    rng = random.Random(seed)
    specs = []
    n_teacher, n_student = 16, 24
    for i in range(n_teacher):
        specs.append(("teacher", None, None, ["ResNet56", "ResNet110"][i % 2], None, i // 2))
    for i in range(n_student):
        specs.append(("student", None, None, None, ["ResNet20", "ResNet32", "ResNet56"][i % 3],
                      i // 3))
    n_distill = n_runs - len(specs)
    combos = [(m, a, t, s) for t, s in PAIRS for m in METHODS for a in ALPHAS]
    for i in range(n_distill):
        m, a, t, s = combos[i % len(combos)]
        specs.append(("distill", m, a, t, s, i // len(combos)))
    total = 0
    for kind, method, alpha, teacher, student, sd in specs[:n_runs]:
        if kind == "teacher":
            rel = f"Cifar100/teachers/{teacher}/{sd}"
            run = {"kind": kind, "dataset": "Cifar100", "method": None, "alpha": None,
                   "teacher": None, "student": teacher, "seed": sd, "num_classes": 100}
            final = 73.0
        elif kind == "student":
            rel = f"Cifar100/none/{student}/{sd}"
            run = {"kind": kind, "dataset": "Cifar100", "method": "none", "alpha": None,
                   "teacher": None, "student": student, "seed": sd, "num_classes": 100}
            final = 69.0
        else:
            rel = f"Cifar100/{method}/alpha_{format(alpha, 'g')}/{teacher}_to_{student}/{sd}"
            run = {"kind": kind, "dataset": "Cifar100", "method": method, "alpha": alpha,
                   "teacher": teacher, "student": student, "seed": sd, "num_classes": 100}
            final = 70.0 + alpha
        acc = [round(final * (1 - math.exp(-4 * (e + 1) / epochs)) + rng.gauss(0, 0.3), 4)
               for e in range(epochs)]
        best = max(acc)
        hist = {
            "train_loss": [round(4 * math.exp(-e / 40) + 0.05, 5) for e in range(epochs)],
            "train_acc": [round(min(99.9, a + 8), 4) for a in acc],
            "test_loss": [round(4 * math.exp(-e / 50) + 0.9, 5) for e in range(epochs)],
            "test_acc": acc,
            "lr": [0.05 * 0.1 ** sum(e >= m for m in (150, 180, 210)) for e in range(epochs)],
            "epoch_seconds": [round(rng.uniform(20, 22), 3) for _ in range(epochs)],
            "skipped_steps": [0] * epochs, "nonfinite_losses": [0] * epochs,
            "terms": {"ce": [round(3 * math.exp(-e / 40), 5) for e in range(epochs)],
                      **({method: [round(0.6 * math.exp(-e / 60), 5) for e in range(epochs)]}
                         if method else {})},
            "grad_share": [round(rng.uniform(0.2, 0.5), 4) if method else None
                           for _ in range(epochs)],
        }
        data = {"status": "complete", "error": None, "run": run, "method_version": 1,
                "epochs_planned": epochs, "epochs_done": epochs, "history": hist,
                "best_acc": best, "best_epoch": acc.index(best) + 1, "last_acc": acc[-1],
                "teacher_acc": 73.0 if method else None,
                "config": {"epochs": epochs, "lr": 0.05, "batch_size": 64},
                "provenance": {"git_commit": "0" * 40, "git_dirty": False}}
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.json", "progress.json"):  # as kdlab writes them, with their checksum
            atomic_write_json(d / name, data)
        total += (d / "metrics.json").stat().st_size
    return total


def naive_table(experiments: Path, out_csv: Path) -> dict:
    """Baseline: json.load every run file, group, mean/stdev, CSV. No cache."""
    groups: dict[tuple, list] = {}
    for dirpath, _dirs, files in os.walk(experiments):
        name = "metrics.json" if "metrics.json" in files else (
            "progress.json" if "progress.json" in files else None)
        if name is None:
            continue
        with open(os.path.join(dirpath, name)) as fh:
            data = json.load(fh)
        if data.get("status") != "complete" or name != "metrics.json":
            continue
        run = data["run"]
        key = (run["dataset"], run.get("teacher") or "", run["student"] or "",
               run.get("kind"), run.get("method") or "", format(run["alpha"], "g")
               if run.get("alpha") is not None else "")
        groups.setdefault(key, []).append((data["best_acc"], data["last_acc"]))
    rows = {}
    with open(out_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "teacher", "student", "kind", "method", "alpha", "n",
                    "best_mean", "best_std", "last_mean", "last_std"])
        for key in sorted(groups):
            b = [v[0] for v in groups[key]]
            l = [v[1] for v in groups[key]]
            row = [statistics.mean(b), statistics.stdev(b) if len(b) > 1 else "",
                   statistics.mean(l), statistics.stdev(l) if len(l) > 1 else ""]
            w.writerow([*key, len(b), *row])
            rows[key] = row
    return rows


def project_table(experiments: Path) -> list[dict]:
    """The project's table and health list from scratch (no cache), no files written."""
    summaries, _cache, _parsed = R.load_runs(str(experiments), cache=None)
    rows = R.build_table(summaries, 5.0, None)
    R.table_csv(rows)
    R.table_markdown(rows)
    R.build_health(summaries, 5.0, None)
    return rows


def best_of(n: int, fn, *args, **kw):
    times, result = [], None
    for _ in range(n):
        t = time.perf_counter()
        result = fn(*args, **kw)
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=240)
    ap.add_argument("--curve-runs", type=int, default=24,
                    help="runs in the per-run curve sample (0: skip)")
    ap.add_argument("--jobs", type=int, default=None, help="curve drawing processes")
    ap.add_argument("--keep", type=Path, default=None, help="keep the files in this directory")
    a = ap.parse_args(argv)
    if a.runs <= 40 or a.epochs < 1:
        ap.error("--runs must be above 40 (16 teachers and 24 plain students come first, then the "
                 "distilled runs), --epochs at least 1")

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
    exp, out = tmp / "experiments", tmp / "results"
    shutil.rmtree(exp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    quiet = {"log": lambda m: None}
    try:
        t = time.perf_counter()
        nbytes = fabricate(exp, a.runs, a.epochs)
        print(f"fabricated {a.runs} runs x {a.epochs} epochs "
              f"({2 * nbytes / 1e6:.0f} MB of JSON) in {time.perf_counter() - t:.1f} s; "
              f"CPUs available: {R._default_jobs()} (capped at 4)\n")

        t_naive, naive_rows = best_of(3, naive_table, exp, tmp / "naive.csv")
        t_table, rows = best_of(3, project_table, exp)
        # Same numbers from both (sanity): compare the best-accuracy means.
        # (teacher and student rows repeat once per pair in ours, hence "distill" only).
        ours = sorted(r["best_mean"] for r in rows if r["role"] == "distill")
        theirs = sorted(v[0] for k, v in naive_rows.items() if k[3] == "distill")
        assert len(ours) == len(theirs) and all(
            abs(x - y) < 1e-9 for x, y in zip(ours, theirs)), "tables disagree"

        t_cold, _ = best_of(1, R.run_results, str(exp), str(out), curves=False, **quiet)
        t_warm, rep = best_of(3, R.run_results, str(exp), str(out), curves=False, **quiet)
        assert rep["parsed"] == 0 and rep["drawn"] == [], rep["drawn"]
        one = exp / "Cifar100/kd/alpha_0.1/ResNet56_to_ResNet20/0/metrics.json"  # the first distilled run
        data = json.loads(one.read_text())
        data["best_acc"] += 0.5
        atomic_write_json(one, data)
        t_one, rep1 = best_of(1, R.run_results, str(exp), str(out), curves=False, **quiet)
        assert rep1["parsed"] == 1 and len(rep1["drawn"]) == 2

        w = 62
        print(f"{'table of ' + str(a.runs) + ' runs':<{w}} {'time':>9} {'vs naive':>10}")
        print(f"{'naive: json.load everything + statistics + csv':<{w}} {t_naive:8.3f}s "
              f"{1.0:9.2f}x")
        print(f"{'kdlab: table + health from scratch (every file parsed)':<{w}} {t_table:8.3f}s "
              f"{t_naive / t_table:9.2f}x")
        print(f"{'kdlab results --no-curves, cold (+2 figures at 300 dpi)':<{w}} {t_cold:8.3f}s "
              f"{t_naive / t_cold:9.2f}x")
        print(f"{'kdlab results --no-curves, re-run, nothing changed':<{w}} {t_warm:8.3f}s "
              f"{t_naive / t_warm:9.2f}x")
        print(f"{'kdlab results --no-curves, re-run, 1 run changed (2 redrawn)':<{w}} "
              f"{t_one:8.3f}s {t_naive / t_one:9.2f}x")
        print(f"\nre-run / cold ratio: {t_warm / t_cold:.3f} "
              f"(cold is {t_cold / t_warm:.0f}x slower than an unchanged re-run)")

        if a.curve_runs:
            sub_exp, sub_out = tmp / "curve-sample", tmp / "curve-results"
            shutil.rmtree(sub_exp, ignore_errors=True)
            shutil.rmtree(sub_out, ignore_errors=True)
            for p in sorted(exp.rglob("metrics.json"))[:a.curve_runs]:
                dst = sub_exp / p.parent.relative_to(exp)
                shutil.copytree(p.parent, dst)
            t_first, r1 = best_of(1, R.run_results, str(sub_exp), str(sub_out),
                                  jobs=a.jobs, **quiet)
            t_again, r2 = best_of(3, R.run_results, str(sub_exp), str(sub_out),
                                  jobs=a.jobs, **quiet)
            n = sum(1 for d in r1["drawn"] if d.startswith(R.CURVES_DIR))
            jobs = a.jobs or R._default_jobs()
            per = t_first / max(n, 1)
            print(f"\ncurves, sample of {a.curve_runs} runs (jobs={jobs}, 150 dpi): first draw "
                  f"{t_first:.2f} s ({n} curves + 2 figures, {per:.2f} s per run incl. "
                  f"start-up); unchanged re-run {t_again:.3f} s "
                  f"({len(r2['skipped'])} skipped, {len(r2['drawn'])} drawn); "
                  f"ratio {t_first / t_again:.0f}x")
            print(f"  -> a first full draw of {a.runs} curves takes about "
                  f"{per * a.runs / 60:.0f} min at jobs={jobs}; afterwards only new or changed "
                  f"runs are drawn.")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
