"""Tests of ``kdlab results`` on fabricated run directories (CPU, JSON only)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab import results as R

REPO = Path(__file__).resolve().parents[1]
VERSIONS = {"kd": 1, "fitnets": 1, "rkd": 2, "ft": 1}
PNG_SIG = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


# ------------------------------------------------------------------ fabrication

def run_rel(kind, dataset, method=None, alpha=None, teacher=None, student=None, seed=0,
            setting=None, **_):
    if kind == "teacher":
        return f"{dataset}/teachers/{student}/{seed}"
    if kind == "student":
        return f"{dataset}/none/{student}/{seed}"
    setting = setting or f"alpha_{format(alpha, 'g')}"
    return f"{dataset}/{method}/{setting}/{teacher}_to_{student}/{seed}"


def write_run(root, kind, *, dataset="Cifar100", method=None, alpha=None, teacher=None,
              student=None, seed=0, best=70.0, last=None, status="complete", error=None,
              version=1, progress_only=False, epochs=12, done=None, num_classes=100,
              setting=None, training=None, source=None):
    """Write a run directory following docs/run-files.md; return its relative path.
    `setting` names a distilled run's loss-setting directory (default alpha_<alpha>),
    `training` the recorded training block, `source` an imported teacher's origin."""
    rel = run_rel(kind, dataset, method, alpha, teacher, student, seed, setting)
    d = Path(root, rel)
    d.mkdir(parents=True, exist_ok=True)
    done = epochs if done is None else done
    last = best - 0.3 if last is None else last
    # test_acc rises to `best` at the second-to-last epoch and ends at `last`.
    acc = [best * (e + 1) / max(done - 1, 1) for e in range(done - 1)] + [last]
    acc = [min(a, best) for a in acc]
    if done >= 2:
        acc[-2] = best
    history = {
        "train_loss": [3.0 / (e + 1) for e in range(done)],
        "train_acc": [min(99.0, a + 4) for a in acc],
        "test_loss": [3.2 / (e + 1) + 0.2 for e in range(done)],
        "test_acc": acc,
        "lr": [0.05 if e < epochs // 2 else 0.005 for e in range(done)],
        "epoch_seconds": [1.0] * done,
        "skipped_steps": [0] * done,
        "nonfinite_losses": [0] * done,
        "terms": {"ce": [2.5 / (e + 1) for e in range(done)],
                  **({method or "x": [0.5 / (e + 1) for e in range(done)]}
                     if kind == "distill" else {})},
        "grad_share": [0.3] * done if kind == "distill" else [None] * done,
    }
    run = {"kind": kind, "dataset": dataset,
           "method": method if kind == "distill" else "none",
           "alpha": alpha, "teacher": teacher if kind == "distill" else None,
           "student": student, "seed": seed, "num_classes": num_classes}
    if setting:  # as train.py records the loss form
        run.update(alpha=None, recipe=setting)
    data = {"status": status, "error": error, "run": run, "method_version": version,
            "epochs_planned": epochs, "epochs_done": done, "history": history,
            "best_acc": best, "best_epoch": acc.index(best) + 1 if best in acc else None,
            "last_acc": acc[-1], "teacher_acc": 74.0 if kind == "distill" else None,
            "config": {"training": training or {"epochs": epochs}},
            "provenance": {"git_commit": "abc"}}
    if source:
        data["source"] = source
    (d / "progress.json").write_text(json.dumps(data))
    if not progress_only:
        (d / "metrics.json").write_text(json.dumps(data))
    return rel


def fabricate(root):
    """A small campaign with planted problems. Returns the expectations."""
    T, S = "ResNet56", "ResNet20"
    values = {}  # table key -> list of (seed, best, last) that must be in the table

    def complete(kind, key, **kw):
        rel = write_run(root, kind, **kw)
        values.setdefault(key, []).append((kw.get("seed", 0), kw["best"], kw["last"]))
        return rel

    for seed, (b, l) in enumerate([(72.1, 71.9), (72.6, 72.2)]):
        complete("teacher", ("teacher", ""), student=T, seed=seed, best=b, last=l)
    for seed, (b, l) in enumerate([(69.0, 68.7), (69.4, 69.1), (68.8, 68.8)]):
        complete("student", ("none", ""), student=S, seed=seed, best=b, last=l)
    base = {"kd": 70.5, "fitnets": 69.3, "rkd": 69.8}
    planted = {"incomplete": set(), "failed": set(), "near_chance": set(), "outdated": set()}
    for method, b0 in base.items():
        for alpha in (0.5, 0.9):
            for seed in range(3):
                kw = dict(method=method, alpha=alpha, teacher=T, student=S, seed=seed,
                          version=VERSIONS[method])
                best = round(b0 + alpha + 0.37 * seed - 0.11 * seed * seed, 2)
                last = round(best - 0.05 * (seed + 1), 2)
                if (method, alpha, seed) == ("rkd", 0.5, 2):      # the old RKD failure
                    best, last = 1.8, 1.2
                    planted["near_chance"].add(run_rel("distill", "Cifar100", **kw))
                if (method, alpha, seed) == ("rkd", 0.9, 0):      # made with loss v1
                    rel = write_run(root, "distill", **{**kw, "version": 1}, best=best, last=last)
                    planted["outdated"].add(rel)
                    continue
                if (method, alpha, seed) == ("fitnets", 0.9, 1):   # stopped by the guard
                    rel = write_run(root, "distill", **kw, best=12.0, status="failed",
                                    error="non-finite loss in 50 consecutive steps",
                                    progress_only=True, done=4)
                    planted["failed"].add(rel)
                    continue
                if (method, alpha, seed) == ("kd", 0.9, 2):       # still training
                    rel = write_run(root, "distill", **kw, best=40.0, status="running",
                                    progress_only=True, done=5)
                    planted["incomplete"].add(rel)
                    continue
                complete("distill", (method, format(alpha, "g")), **kw, best=best, last=last)
    # A single seed (std must be empty, not 0 or an error).
    complete("distill", ("ft", "0.5"), method="ft", alpha=0.5, teacher=T, student=S, seed=0,
             best=70.2, last=70.0, version=1)
    # A running run one epoch in: low accuracy, but incomplete, not "near chance".
    planted["incomplete"].add(write_run(root, "distill", method="ft", alpha=0.5, teacher=T,
                                        student=S, seed=1, best=3.0, status="running",
                                        progress_only=True, done=1))
    # progress.json says complete but metrics.json is missing: not complete.
    planted["incomplete"].add(write_run(root, "student", student=S, seed=7, best=69.9,
                                        status="complete", progress_only=True))
    return values, planted, (T, S)


def png_size(path):
    """(width, height) from the IHDR chunk; asserts a complete PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIG, f"{path}: not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR"
    assert data.endswith(PNG_END), f"{path}: truncated PNG"
    return struct.unpack(">II", data[16:24])


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def make_parser():
    parser = argparse.ArgumentParser(prog="kdlab")
    R.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def cli(*argv):
    args = make_parser().parse_args(["results", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    exp, out = root / "experiments", root / "results"
    values, planted, pair = fabricate(exp)
    report = R.run_results(str(exp), str(out), chance_margin=5.0, method_versions=VERSIONS,
                           jobs=2, log=lambda m: None)
    return exp, out, values, planted, pair, report


# ------------------------------------------------------------------------ table

def test_table_values_equal_independent_mean_and_sample_std(campaign):
    exp, out, values, planted, (T, S), report = campaign
    rows = read_csv(out / R.TABLE_CSV)
    assert list(rows[0].keys()) == R.CSV_COLUMNS
    got = {(r["method"] if r["role"] != "teacher" else "teacher", r["alpha"]): r for r in rows}
    assert set(got) == set(values), "one row per method/alpha plus teacher and student"
    assert len(rows) == len(values)
    for key, vals in values.items():
        r = got[key]
        assert (r["dataset"], r["teacher"], r["student"]) == ("Cifar100", T, S)
        assert int(r["n_seeds"]) == len(vals)
        assert r["seeds"].split() == [str(s) for s, _, _ in sorted(vals)]
        for col, idx in (("best", 1), ("last", 2)):
            xs = [v[idx] for v in vals]
            assert float(r[f"{col}_mean"]) == pytest.approx(statistics.mean(xs), abs=1e-6)
            if len(xs) > 1:
                assert float(r[f"{col}_std"]) == pytest.approx(statistics.stdev(xs), abs=1e-6)
                assert float(r[f"{col}_std"]) != pytest.approx(statistics.pstdev(xs), abs=1e-9)
            else:
                assert r[f"{col}_std"] == ""
    # The outdated run is left out (2 seeds left); the near-chance run stays in, flagged.
    assert int(got[("rkd", "0.9")]["n_seeds"]) == 2
    assert int(got[("rkd", "0.5")]["n_near_chance"]) == 1
    assert sum(int(r["n_near_chance"]) for r in rows) == 1
    # CRD order: teacher, plain student, then methods (kd, fitnet, rkd, ft), alpha rising.
    order = [(r["role"], r["method"], r["alpha"]) for r in rows]
    assert order[:2] == [("teacher", "", ""), ("student", "none", "")]
    assert [m for _, m, _ in order[2:]] == ["kd", "kd", "fitnets", "fitnets", "rkd", "rkd", "ft"]
    assert [a for _, _, a in order[2:4]] == ["0.5", "0.9"]


def test_markdown_table_shows_mean_pm_std_in_crd_order(campaign):
    exp, out, values, planted, (T, S), report = campaign
    md = (out / R.TABLE_MD).read_text()
    kd = [v[1] for v in values[("kd", "0.5")]]
    cell = f"{statistics.mean(kd):.2f} ± {statistics.stdev(kd):.2f}"
    assert f"| {T} → {S} | kd | α 0.5 | {cell} |" in md
    # Single seed: the value alone, no "±"; no published number (the recipe is not CRD's).
    assert "| ft | α 0.5 | 70.20 | 70.00 | – | – | – | 1 |" in md
    assert md.index(f"Teacher ({T})") < md.index(f"Student ({S}") < md.index("| kd | α 0.5")
    assert "outdated method version are left out" in md
    # CRD-style summary: each method at its best alpha.
    kd9 = [v[1] for v in values[("kd", "0.9")]]
    best_kd = max(statistics.mean(kd), statistics.mean(kd9))
    assert f"{best_kd:.2f} ± " in md.split("## All runs")[0]


# ------------------------------------------------- registry and literature

def test_registry_is_read_without_importing_it(tmp_path):
    from kdlab.methods import method_versions              # the real registry (torch)
    assert list(R.registry_versions().items()) == list(method_versions().items())
    # Any registry of that form: modules named in METHODS, in order, with their versions.
    (tmp_path / "__init__.py").write_text(
        "from . import plain, zeta as z, alpha\nMETHODS = {m.NAME: m for m in (plain, z, alpha)}\n")
    for module, name, version in (("plain", "none", 1), ("zeta", "zz", 3), ("alpha", "aa", 2)):
        (tmp_path / f"{module}.py").write_text(f"import torch\nNAME = {name!r}\nVERSION = {version}\n")
    assert list(R.registry_versions(tmp_path).items()) == [("none", 1), ("zz", 3), ("aa", 2)]
    (tmp_path / "__init__.py").write_text("METHODS = {}\n")
    with pytest.raises(ValueError, match="METHODS"):
        R.registry_versions.__wrapped__(tmp_path)


def test_summary_has_a_column_per_registered_method(campaign):
    exp, out, values, planted, pair, report = campaign
    md = (out / R.TABLE_MD).read_text()
    methods = [m for m in R.registry_versions() if m != "none"]
    head = "| Dataset | Teacher → Student | Teacher | Student | " + " | ".join(methods) + " |"
    summary = md.split("## Summary")[1].split("##")[0]
    assert "best-epoch test accuracy" in summary.splitlines()[0]
    assert head in summary
    # Only the campaign's methods have runs; the others are there, empty.
    rows = [line for line in summary.splitlines() if "→" in line and not line.startswith("| Dataset")]
    assert len(rows) == 1, rows
    cells = dict(zip(head.strip("| ").split(" | "), rows[0].strip("| ").split(" | ")))
    ran = {method for method, _ in values} - {"teacher", "none"}
    assert ran and all(cells[m] != "–" for m in ran), cells
    assert all(cells[m] == "–" for m in methods if m not in ran), cells


CRD = {"epochs": 240, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
       "schedule": "multistep", "milestones": [150, 180, 210], "lr_decay": 0.1,
       "label_smoothing": 0.0, "amp": "off", "num_workers": 4, "device": "auto"}


def test_published_numbers_beside_ours_on_the_source_metric(tmp_path):
    exp, out = tmp_path / "e", tmp_path / "o"
    T, S = "ResNet56", "ResNet20"
    pair = dict(teacher=T, student=S)
    write_run(exp, "teacher", student=T, best=73.0, last=72.5, training=CRD)
    for seed, last in enumerate([69.2, 68.8]):
        write_run(exp, "student", student=S, seed=seed, best=69.9, last=last, training=CRD)
    for seed, last in enumerate([70.9, 70.5]):
        write_run(exp, "distill", method="kd", alpha=0.9, **pair, seed=seed, best=71.5, last=last,
                  training=CRD)
        # The additive form: no alpha, its own row.
        write_run(exp, "distill", method="kd", setting="additive_ce1_kd0.9", **pair,
                  seed=seed, best=71.0, last=last - 1, training=CRD)
    # Another recipe: no comparison. A row mixing recipes: none either.
    write_run(exp, "distill", method="fitnets", alpha=0.5, **pair, best=70.0, last=69.8,
              training={**CRD, "epochs": 200})
    write_run(exp, "distill", method="rkd", alpha=0.5, **pair, seed=0, best=70.0, training=CRD)
    write_run(exp, "distill", method="rkd", alpha=0.5, **pair, seed=1, best=70.0,
              training={**CRD, "lr": 0.1})
    # A published teacher, imported: compared on dataset and model alone.
    write_run(exp, "teacher", student="ResNet110", best=74.2, last=74.2,
              training={"device": "cpu"}, source={"path": "r110.pth", "sha256": "0"})
    rep = R.run_results(str(exp), str(out), metric="best", dpi=60, curves=False,
                        log=lambda m: None)
    assert rep["errors"] == []
    rows = {(r["teacher"], r["role"], r["method"], r["setting"]): r
            for r in read_csv(out / R.TABLE_CSV)}
    kd = rows[(T, "distill", "kd", "alpha_0.9")]
    assert (kd["alpha"], kd["published_source"], kd["published"], kd["published_metric"]) == \
        ("0.9", "crd2020", "70.66", "last")
    assert float(kd["ours_minus_published"]) == pytest.approx(70.7 - 70.66)
    add = rows[(T, "distill", "kd", "additive_ce1_kd0.9")]
    assert (add["alpha"], add["n_seeds"], add["published"]) == ("", "2", "70.66")
    assert float(add["last_mean"]) == pytest.approx(69.7)
    teacher = rows[(T, "teacher", "", "")]
    assert float(teacher["ours_minus_published"]) == pytest.approx(72.5 - 72.34)
    student = rows[(T, "student", "none", "")]
    assert float(student["ours_minus_published"]) == pytest.approx(69.0 - 69.06)
    for method in ("fitnets", "rkd"):
        r = rows[(T, "distill", method, "alpha_0.5")]
        assert (r["published_source"], r["published"], r["ours_minus_published"]) == ("", "", "")
    imported = rows[("ResNet110", "teacher", "", "")]
    assert float(imported["ours_minus_published"]) == pytest.approx(74.2 - 74.31)

    md = (out / R.TABLE_MD).read_text()
    assert "| ResNet110 → – | Teacher (ResNet110, imported) |" in md
    assert f"| {T} → ResNet20 | Teacher ({T}) |" in md  # trained here
    compared = md.split("## Compared with crd2020")[1].split("## All runs")[0]
    assert compared.startswith(": last-epoch test accuracy")
    lines = compared.splitlines()
    ours = next(l for l in lines if "| ours |" in l and T in l)
    published = lines[lines.index(ours) + 1]
    delta = lines[lines.index(ours) + 2]
    assert "| 72.50 | 69.00 ± 0.28 | 70.70 ± 0.28 (α 0.9) | – |" in ours
    assert "| published (crd2020) | 72.34 | 69.06 | 70.66 | – |" in published
    assert "| Δ ours − published | +0.16 | −0.06 | +0.04 | – |" in delta
    assert "| kd | additive ce1 kd0.9 | 71.00 ± 0.00 | 69.70 ± 0.28 | 70.66 | last | −0.96 | 2 |" in md
    # The summary shows the best epoch, as its title says; the last-epoch figure draws the
    # published numbers (the source's metric), the best-epoch one does not.
    assert "best-epoch test accuracy" in md.split("## Summary")[1].splitlines()[0]
    panels = {m: R.figures.aggregate_data(R.build_table(R.load_runs(str(exp))[0]), m)
              for m in ("best", "last")}
    kd_points = {m: next(p for p in panels[m] if p["teacher"] == T)["methods"]["kd"]
                 for m in panels}
    assert {q["published"] for q in kd_points["last"]} == {70.66}
    assert {q["published"] for q in kd_points["best"]} == {None}
    R.run_results(str(exp), str(tmp_path / "last"), metric="last", dpi=60, curves=False,
                  log=lambda m: None)
    png_size(tmp_path / "last" / R.FIG_BEST)


def test_every_registered_method_has_a_colour_of_its_own():
    """CRD, 11th in the registry, was drawn in the plain student's grey: its bar and line looked
    like the "Student (no KD)" reference."""
    from kdlab.methods import METHODS
    from kdlab.results.figures import STUDENT_COLOUR, TEACHER_COLOUR, MethodStyle
    style = MethodStyle(list(METHODS))
    colours = [style.colour(m).upper() for m in METHODS]
    assert len(set(colours)) == len(colours)
    assert not {STUDENT_COLOUR.upper(), TEACHER_COLOUR.upper()} & set(colours)


# ----------------------------------------------------------------------- health

def test_health_names_exactly_the_planted_runs(campaign):
    exp, out, values, planted, pair, report = campaign
    h = json.loads((out / R.HEALTH_JSON).read_text())
    for key in ("incomplete", "failed", "near_chance", "outdated"):
        assert {e["run"] for e in h[key]} == planted[key], key
    assert h["unreadable"] == [] and h["misplaced"] == [] and h["duplicates"] == []
    assert (h["counts"]["misplaced"], h["counts"]["duplicate"]) == (0, 0)
    (failed,) = h["failed"]
    assert failed["error"] == "non-finite loss in 50 consecutive steps"
    assert failed["epochs_done"] == 4
    (near,) = h["near_chance"]
    assert near["best_acc"] == 1.8 and near["chance"] == pytest.approx(1.0)
    (old,) = h["outdated"]
    assert (old["method_version"], old["current_version"]) == (1, 2)
    statuses = {e["run"]: e["status"] for e in h["incomplete"]}
    assert sorted(statuses.values()) == ["finishing", "running", "running"]
    n_runs = sum(1 for _ in exp.rglob("progress.json"))
    assert h["counts"]["runs"] == n_runs
    md = (out / R.HEALTH_MD).read_text()
    for runs in planted.values():
        for rel in runs:
            assert f"`{rel}`" in md
    assert "non-finite loss in 50 consecutive steps" in md


def test_chance_margin_and_include_outdated(campaign, tmp_path):
    exp, out, values, planted, pair, report = campaign
    s = R.run_results(str(exp), str(tmp_path / "o"), chance_margin=0.5, curves=False,
                      method_versions=VERSIONS, include_outdated=True, log=lambda m: None)
    assert s["health"]["near_chance"] == []          # 1.8 > 1.0 + 0.5
    rows = read_csv(tmp_path / "o" / R.TABLE_CSV)
    rkd9 = next(r for r in rows if r["method"] == "rkd" and r["alpha"] == "0.9")
    assert rkd9["n_seeds"] == "3"
    # Without --method-versions nothing is outdated and the table keeps every run.
    s = R.run_results(str(exp), str(tmp_path / "p"), curves=False, log=lambda m: None)
    assert s["health"]["outdated"] == [] and s["health"]["method_versions"] is None
    assert "Not checked" in (tmp_path / "p" / R.HEALTH_MD).read_text()


# ---------------------------------------------------------------------- figures

def test_every_figure_is_a_valid_png_of_sensible_size(campaign):
    exp, out, values, planted, pair, report = campaign
    assert report["errors"] == []
    for name in (R.FIG_ALPHA, R.FIG_BEST):
        w, h = png_size(out / name)
        assert 1200 <= w <= 12000 and 600 <= h <= 8000, (name, w, h)
    curves = sorted((out / R.CURVES_DIR).glob("*.png"))
    runs = sorted(p.parent for p in exp.rglob("progress.json"))
    assert len(curves) == len(runs)          # running and failed runs get curves too
    expected = {R.curve_name(p.relative_to(exp).as_posix()) for p in runs}
    assert {p.name for p in curves} == expected
    for p in curves:
        w, h = png_size(p)
        assert 1000 <= w <= 4000 and 600 <= h <= 3000, (p.name, w, h)
        assert p.stat().st_size > 20_000     # not blank
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_mean_std_helper():
    assert R.mean_std([70.0])[0] == 70.0 and math.isnan(R.mean_std([70.0])[1])
    m, s = R.mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(statistics.mean([1, 2, 4]))
    assert s == pytest.approx(statistics.stdev([1, 2, 4]))
    assert all(math.isnan(x) for x in R.mean_std([]))


# ------------------------------------------------------------------ entry point

def test_argparse_entry_point(campaign, tmp_path, capsys, monkeypatch):
    exp, out, values, planted, pair, report = campaign
    o = tmp_path / "cli"
    rc = cli(exp, "--out", o, "--chance-margin", 5, "--method-versions",
             json.dumps(VERSIONS), "--no-curves")
    assert rc == 0
    assert read_csv(o / R.TABLE_CSV) == read_csv(out / R.TABLE_CSV)
    assert not (o / R.CURVES_DIR).exists()
    for name in R.OUTPUT_FILES:
        assert (o / name).is_file(), name
    assert "runs (" in capsys.readouterr().err
    vfile = tmp_path / "versions.json"
    vfile.write_text(json.dumps({"rkd": 3}))
    assert cli(exp, "--out", o, "--method-versions", vfile, "--no-curves", "--quiet") == 0
    h = json.loads((o / R.HEALTH_JSON).read_text())
    assert len(h["outdated"]) == sum(1 for p in exp.glob("Cifar100/rkd/*/*/*"))
    # Teachers and plain students are trained with method "none": its version counts.
    assert cli(exp, "--out", o, "--method-versions", '{"none": 2}', "--no-curves",
               "--quiet") == 0
    h = json.loads((o / R.HEALTH_JSON).read_text())
    assert {e["run"].split("/")[1] for e in h["outdated"]} == {"teachers", "none"}
    assert {r["role"] for r in read_csv(o / R.TABLE_CSV)} == {"distill"}
    with pytest.raises(SystemExit) as exc:
        cli(exp, "--out", o, "--method-versions", "{not json", "--quiet")
    assert exc.value.code == 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()  # the default, which must exist
    args = make_parser().parse_args(["results"])
    assert (args.experiments, args.out, args.chance_margin, args.method_versions) == \
        ("experiments", "results", 5.0, None)


def test_quiet_still_names_a_figure_that_could_not_be_drawn(tmp_path, capsys):
    # The cron line of docs/results.md runs with --quiet: its log must say why the exit status is 1.
    exp, out = tmp_path / "experiments", tmp_path / "results"
    rel = write_run(exp, "student", student="B", done=2)
    (out / R.CURVES_DIR / R.curve_name(rel)).mkdir(parents=True)  # where the curve's file must go
    assert cli(exp, "--out", out, "--jobs", 1, "--quiet") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"could not draw {R.CURVES_DIR}/{R.curve_name(rel)}: IsADirectoryError" in err


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_earlier_outputs(tmp_path, capsys, monkeypatch):
    """Disk full or quota exceeded in --out (ENOSPC, EDQUOT; here at fsync, where NFS and Lustre report
    a quota): exit 1 with one line naming the file, as kdlab's other commands do (it was a traceback), the
    earlier outputs as they were, and no temporary file."""
    exp, out = tmp_path / "experiments", tmp_path / "results"
    write_run(exp, "teacher", student="A", best=70.0, last=69.0)
    assert cli(exp, "--out", out, "--no-curves", "--quiet") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_run(exp, "teacher", student="A", seed=1, best=60.0, last=59.0)

    def full(fd):
        raise OSError(122, "Disk quota exceeded")
    monkeypatch.setattr(os, "fsync", full)
    assert cli(exp, "--out", out, "--no-curves", "--quiet") == 1
    assert capsys.readouterr().err == f"kdlab results: error: [Errno 122] Disk quota exceeded: '{out / R.TABLE_CSV}'\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_runs_while_a_run_is_in_progress(tmp_path, capsys):
    exp, out = tmp_path / "experiments", tmp_path / "results"
    rel = write_run(exp, "distill", method="kd", alpha=0.5, teacher="A", student="B",
                    status="running", progress_only=True, done=3, best=20.0)
    assert cli(exp, "--out", out, "--jobs", 1) == 0
    h = json.loads((out / R.HEALTH_JSON).read_text())
    assert [e["run"] for e in h["incomplete"]] == [rel]
    assert h["incomplete"][0]["epochs_done"] == 3
    assert read_csv(out / R.TABLE_CSV) == []               # header only: nothing complete
    assert (out / R.TABLE_CSV).read_text().startswith(",".join(R.CSV_COLUMNS))
    png_size(out / R.CURVES_DIR / R.curve_name(rel))
    png_size(out / R.FIG_ALPHA)


def test_missing_experiments_directory_writes_nothing(tmp_path, capsys):
    # A mistyped path must not replace the results of a grid with empty ones.
    exp, out = tmp_path / "experiments", tmp_path / "results"
    out.mkdir()
    (out / R.TABLE_MD).write_text("the grid's table")
    with pytest.raises(SystemExit) as stop:
        cli(exp, "--out", out)
    assert stop.value.code == 2
    assert f"argument experiments: {exp} does not exist (nothing was written)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [R.TABLE_MD]
    assert (out / R.TABLE_MD).read_text() == "the grid's table"


def test_empty_experiments_directory(tmp_path, capsys):
    exp, out = tmp_path / "experiments", tmp_path / "results"
    exp.mkdir()
    assert cli(exp, "--out", out) == 0
    err = capsys.readouterr().err
    assert "no runs" in err and str(exp) in err
    assert (out / R.TABLE_CSV).read_text() == ",".join(R.CSV_COLUMNS) + "\n"
    assert "No completed runs yet" in (out / R.TABLE_MD).read_text()
    h = json.loads((out / R.HEALTH_JSON).read_text())
    assert h["counts"]["runs"] == 0 and h["failed"] == [] and h["incomplete"] == []
    assert "# Run health" in (out / R.HEALTH_MD).read_text()
    for name in (R.FIG_ALPHA, R.FIG_BEST):   # placeholders, so declared outputs exist
        png_size(out / name)


# A bad value of each option: (arguments, the option the error names, what it says).
# "{file}" is an existing plain file.
BAD_ARGUMENTS = [
    (["--out", "{file}"], "--out", "{file} is a file, not a directory"),
    (["--out", "{file}/sub"], "--out", "is a file, not a directory"),
    (["--out", ""], "--out", "must not be empty"),
    (["{file}"], "experiments", "{file} is a file, not a directory"),
    ([""], "experiments", "must not be empty"),
    *[(["--dpi", v], "--dpi", "from 10 to 600") for v in ("0", "-5", "9", "601", "100000")],
    (["--dpi", "3.5"], "--dpi", "not an integer"),
    *[(["--curve-dpi", v], "--curve-dpi", "from 10 to 600") for v in ("0", "100000")],
    *[(["--jobs", v], "--jobs", "from 1 to 256") for v in ("0", "-1", "257")],
    (["--jobs", "two"], "--jobs", "not an integer"),
    *[([f"--chance-margin={v}"], "--chance-margin",  # "=": argparse takes "-inf" for an option
       "finite number of percentage points from 0 to 100")
      for v in ("nan", "inf", "-inf", "-1", "100.5")],
    (["--chance-margin", "five"], "--chance-margin", "not a number"),
    *[(["--method-versions", json.dumps({"rkd": 2, "kd": v})], "--method-versions",
       f"version of 'kd' must be a positive integer, not {json.dumps(v)}")
      for v in (None, {"a": 1}, True, 0, -1, 1.5, "2")],
    (["--method-versions", "[1, 2]"], "--method-versions", "cannot read '[1, 2]'"),
    (["--method-versions", "{file}"], "--method-versions", "must be a JSON object"),
    (["--method-versions", "{kd: 1}"], "--method-versions", "not valid JSON"),
]


@pytest.mark.parametrize("argv, option, says", BAD_ARGUMENTS,
                         ids=[" ".join(a) or "''" for a, _, _ in BAD_ARGUMENTS])
def test_bad_argument_is_an_argparse_error_naming_the_option(tmp_path, monkeypatch, capsys,
                                                             argv, option, says):
    monkeypatch.chdir(tmp_path)
    Path("file").write_text("[1]")              # a file, and a JSON list as --method-versions
    Path("experiments").mkdir()
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["results", *(a.replace("{file}", "file") for a in argv)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and says.replace("{file}", "file") in err, err
    assert "Traceback" not in err
    assert sorted(os.listdir()) == ["experiments", "file"]  # nothing written, not even --out


def test_range_limits_and_good_method_versions_are_accepted(tmp_path):
    args = make_parser().parse_args(["results", str(tmp_path), "--out", str(tmp_path / "new/o"),
                                     "--dpi", "10", "--curve-dpi", "600", "--jobs", "256",
                                     "--chance-margin", "0", "--method-versions", '{"kd": 3}'])
    assert (args.dpi, args.curve_dpi, args.jobs, args.chance_margin, args.method_versions) == \
        (10, 600, 256, 0.0, {"kd": 3})
    args = make_parser().parse_args(["results", str(tmp_path), "--dpi", "600", "--jobs", "1",
                                     "--chance-margin", "100", "--method-versions", ""])
    assert (args.dpi, args.jobs, args.chance_margin, args.method_versions) == (600, 1, 100.0, None)
    assert not (tmp_path / "new").exists()      # parsing makes no directory


def test_out_in_a_directory_we_cannot_write_is_an_argparse_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["results", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert f"argument --out: cannot write into {tmp_path}" in capsys.readouterr().err


def test_console_summary_counts_unreadable_runs_as_health_does(tmp_path, capsys):
    exp, out = tmp_path / "experiments", tmp_path / "results"
    bad = exp / "Cifar100/teachers/A/1"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("garbage")
    assert cli(exp, "--out", out, "--no-curves", "--dpi", 10) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 runs (0 complete, 0 incomplete, 0 failed, 0 near chance, 0 outdated, " \
           "0 of mixed code, 1 unreadable, 0 misplaced, 0 duplicate)" in last, last
    assert json.loads((out / R.HEALTH_JSON).read_text())["counts"]["unreadable"] == 1
    health = (out / R.HEALTH_MD).read_text()
    assert "## Unreadable run files (1)" in health and "delete the file and run snakemake again" in health


def test_run_results_on_a_file_says_it_is_not_a_directory(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.write_text("")
    said = []
    R.run_results(str(experiments), str(tmp_path / "o"), curves=False, dpi=10, log=said.append)
    assert f"experiments directory '{experiments}' is not a directory" in said[0]


# ----------------------------------------------------------------- incremental

def test_figures_redrawn_only_when_inputs_change(tmp_path):
    exp, out = tmp_path / "experiments", tmp_path / "results"
    rels = [write_run(exp, "distill", method="kd", alpha=a, teacher="A", student="B",
                      seed=s, best=60 + a + s) for a in (0.5, 0.9) for s in (0, 1)]
    running = write_run(exp, "distill", method="rkd", alpha=0.5, teacher="A", student="B",
                        status="running", progress_only=True, done=2, best=10.0)

    def go(**kw):  # low dpi: this test is about when figures are drawn, not how
        return R.run_results(str(exp), str(out), **{"jobs": 1, "dpi": 80, "curve_dpi": 60,
                                                     "log": lambda m: None, **kw})

    def mtimes():
        return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns
                for p in out.rglob("*.png")}

    first = go()
    curve = {rel: f"{R.CURVES_DIR}/{R.curve_name(rel)}" for rel in rels + [running]}
    assert set(first["drawn"]) == {R.FIG_ALPHA, R.FIG_BEST, *curve.values()}
    t0 = mtimes()

    again = go()                                 # nothing changed: nothing drawn
    assert again["drawn"] == [] and again["parsed"] == 0
    assert set(again["skipped"]) == set(first["drawn"])
    assert mtimes() == t0

    # A touch changes the stat but not the content: re-read, not redrawn.
    os.utime(exp / rels[0] / "metrics.json", ns=(1, 1))
    touched = go()
    assert touched["parsed"] == 1 and touched["drawn"] == []

    # A completed run's numbers change: its curve and both aggregates are redrawn.
    write_run(exp, "distill", method="kd", alpha=0.5, teacher="A", student="B", seed=0,
              best=75.0)
    changed = go()
    assert set(changed["drawn"]) == {R.FIG_ALPHA, R.FIG_BEST, curve[rels[0]]}
    t1 = mtimes()
    for rel in rels[1:] + [running]:
        assert t1[curve[rel]] == t0[curve[rel]]
    assert float(read_csv(out / R.TABLE_CSV)[0]["best_mean"]) == pytest.approx(
        statistics.mean([75.0, 61.5]))

    # A running run finishes another epoch: only its curve (the table has complete runs).
    write_run(exp, "distill", method="rkd", alpha=0.5, teacher="A", student="B",
              status="running", progress_only=True, done=3, best=12.0)
    assert go()["drawn"] == [curve[running]]

    # A deleted figure is redrawn; --force redraws everything.
    (out / R.FIG_BEST).unlink()
    assert go()["drawn"] == [R.FIG_BEST]
    assert set(go(force=True)["drawn"]) == set(first["drawn"])
    # So does a change of resolution (it is part of each figure's fingerprint).
    assert set(go(dpi=81)["drawn"]) == {R.FIG_ALPHA, R.FIG_BEST}
    assert set(go()["drawn"]) == {R.FIG_ALPHA, R.FIG_BEST}

    # A removed run takes its curve with it.
    shutil.rmtree(exp / rels[3])
    gone = go()
    assert gone["removed"] == [curve[rels[3]]]
    assert not (out / curve[rels[3]]).exists()
    assert not list(out.rglob("*.tmp"))


def test_temporaries_of_a_killed_run_are_removed_but_not_a_fresh_one(tmp_path):
    """A kill during a write (Snakemake's aggregate killed) leaves `.results.csv.*.tmp`; the next run
    removes it, but not one a minute young (another `kdlab results` writing now, from cron)."""
    exp, out = tmp_path / "experiments", tmp_path / "results"
    write_run(exp, "teacher", student="A", best=70.0, last=69.0)
    (out / R.CURVES_DIR).mkdir(parents=True)
    stale = [out / ".results.csv.k1ll3d.tmp", out / R.CURVES_DIR / ".a.png.k1ll3d.tmp"]
    fresh = out / ".health.md.wr1t1ng.tmp"
    for path in stale + [fresh]:
        path.write_text("partial")
    for path in stale:
        os.utime(path, (time.time() - 120, time.time() - 120))
    R.run_results(str(exp), str(out), curves=False, log=lambda m: None)
    assert not any(p.exists() for p in stale) and fresh.exists()


def test_unreadable_file_is_reported_not_fatal(tmp_path):
    exp, out = tmp_path / "experiments", tmp_path / "results"
    write_run(exp, "teacher", student="A", best=70.0, last=69.0)
    bad = Path(exp, "Cifar100/teachers/A/1")
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text('{"status": "comp')
    rep = R.run_results(str(exp), str(out), curves=False, log=lambda m: None)
    assert [e["run"] for e in rep["health"]["unreadable"]] == ["Cifar100/teachers/A/1"]
    (row,) = read_csv(out / R.TABLE_CSV)
    assert (row["role"], row["n_seeds"], row["best_mean"]) == ("teacher", "1", "70.0")


def test_a_run_file_damaged_into_other_valid_json_or_a_directory_is_unreadable_not_a_result(tmp_path):
    """metrics.json as kdlab writes it carries the checksum of its content: one bit flipped in a number
    ('1' -> '9' in best_acc: still valid JSON) made the table show 90.83 instead of 10.83. A metrics.json
    that is a directory made the run 'finishing' (its progress.json) instead of naming the file."""
    from kdlab.runio import atomic_write_json
    exp, out = tmp_path / "experiments", tmp_path / "results"
    for seed in (0, 1, 2):
        rel = write_run(exp, "teacher", student="A", seed=seed, best=10.83, last=10.5)
        for name in ("metrics.json", "progress.json"):  # rewritten as kdlab writes them: with the checksum
            atomic_write_json(exp / rel / name, json.loads((exp / rel / name).read_text()))
    flipped = exp / "Cifar100/teachers/A/1/metrics.json"
    text = flipped.read_text()
    assert '"sha256"' in text and '"best_acc": 10.83' in text
    flipped.write_text(text.replace('"best_acc": 10.83', '"best_acc": 90.83'))
    directory = exp / "Cifar100/teachers/A/2/metrics.json"
    directory.unlink()
    directory.mkdir()
    write_run(exp, "teacher", student="A", seed=3, best=10.83, last=10.5)  # an older kdlab's file: no checksum
    rep = R.run_results(str(exp), str(out), curves=False, log=lambda m: None)
    unreadable = {e["run"]: e["error"] for e in rep["health"]["unreadable"]}
    assert sorted(unreadable) == ["Cifar100/teachers/A/1", "Cifar100/teachers/A/2"], rep["health"]
    assert "does not match its checksum" in unreadable["Cifar100/teachers/A/1"]
    assert "Is a directory" in unreadable["Cifar100/teachers/A/2"]
    assert rep["health"]["incomplete"] == []
    (row,) = read_csv(out / R.TABLE_CSV)
    assert (row["n_seeds"], row["best_mean"]) == ("2", "10.83")
    assert "delete the file and run snakemake again" in (out / R.HEALTH_MD).read_text()


def test_a_damaged_cache_of_summaries_is_read_again_not_trusted(tmp_path):
    """results/.results-state.json holds each run's summary, used while the run file's size and mtime stay:
    a digit flipped in it (still valid JSON) changed the table. It carries a checksum now: damaged, it is
    dropped and every run file read again."""
    exp, out = tmp_path / "experiments", tmp_path / "results"
    write_run(exp, "teacher", student="A", best=10.83, last=10.5)
    R.run_results(str(exp), str(out), curves=False, log=lambda m: None)
    state = out / ".results-state.json"
    text = state.read_text()
    assert text.count('"best_acc":10.83') == 1
    state.write_text(text.replace('"best_acc":10.83', '"best_acc":90.83'))
    rep = R.run_results(str(exp), str(out), curves=False, log=lambda m: None)
    (row,) = read_csv(out / R.TABLE_CSV)
    assert row["best_mean"] == "10.83" and rep["parsed"] == 1


def test_identity_falls_back_to_the_path(tmp_path):
    exp = tmp_path / "e"
    rel = write_run(exp, "distill", method="rkd", alpha=0.75, teacher="T", student="S",
                    seed=3, best=50.0)
    p = exp / rel / "metrics.json"
    data = json.loads(p.read_text())
    del data["run"]
    p.write_text(json.dumps(data))
    data["best_epoch"] = 10                        # 0-based by some writers: not trusted
    p.write_text(json.dumps(data))
    (s,) = R.load_runs(str(exp))[0]
    assert (s["kind"], s["method"], s["alpha"], s["teacher"], s["student"], s["seed"]) == \
        ("distill", "rkd", "0.75", "T", "S", 3)
    assert s["num_classes"] == 100                 # from the dataset name
    assert s["best_epoch"] == 11                   # 1-based, from the history itself
    # The loss setting as the run recorded it wins over the path; no alpha in additive runs.
    data["run"] = {"kind": "distill", "method": "kd", "alpha": None, "recipe": "additive_ce1_kd0.9"}
    p.write_text(json.dumps(data))
    (s,) = R.load_runs(str(exp))[0]
    assert (s["setting"], s["alpha"], s["method"]) == ("additive_ce1_kd0.9", "", "kd")


def test_module_does_not_import_torch(tmp_path):
    exp = tmp_path / "e"
    write_run(exp, "teacher", student="A", best=70.0, last=69.0)
    code = ("import sys; from kdlab import results as R; "
            f"R.run_results({str(exp)!r}, {str(tmp_path / 'o')!r}, curves=False, "
            "log=lambda m: None); assert 'torch' not in sys.modules, 'torch imported'; "
            # The command line too, which also reads the method registry.
            "from kdlab.cli import main; "
            f"assert main(['results', {str(exp)!r}, '--out', {str(tmp_path / 'c')!r}, "
            "'--no-curves', '--quiet']) == 0; assert 'torch' not in sys.modules, 'torch imported'; "
            f"assert main(['verify', {str(exp)!r}]) == 0; assert 'torch' not in sys.modules, 'torch imported'; "
            # Ctrl-C: one line and 130, as for every command, still without torch.
            "import io, contextlib, kdlab.results.command as C; err = io.StringIO(); "
            "C.run_results = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt); "
            f"contextlib.redirect_stderr(err).__enter__(); assert main(['results', {str(exp)!r}]) == 130; "
            "assert err.getvalue() == 'kdlab results: interrupted\\n', err.getvalue(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def test_additive_recipes_get_their_own_rows(tmp_path):
    exp, out = tmp_path / "experiments", tmp_path / "results"
    write_run(exp, "distill", method="kd", alpha=0.9, teacher="A", student="B", best=60.0)
    convex = Path(exp, write_run(exp, "distill", method="kd", alpha=0.1, teacher="A", student="B", best=50.0))
    additive = exp / "Cifar100/kd/additive_ce0.1_kd0.9/A_to_B/0"
    shutil.copytree(convex, additive)
    for name in ("metrics.json", "progress.json"):
        data = json.loads((additive / name).read_text())
        data["run"].update(alpha=None, loss_form="additive", ce_weight=0.1, kd_weight=0.9,
                           recipe="additive_ce0.1_kd0.9")
        data["best_acc"] = 65.0
        (additive / name).write_text(json.dumps(data))
    shutil.rmtree(convex)
    assert cli(exp, "--out", out, "--jobs", 1) == 0
    rows = {r["setting"]: r for r in read_csv(out / R.TABLE_CSV) if r["method"] == "kd"}
    assert set(rows) == {"alpha_0.9", "additive_ce0.1_kd0.9"}
    assert float(rows["additive_ce0.1_kd0.9"]["best_mean"]) == 65.0 and rows["additive_ce0.1_kd0.9"]["alpha"] == ""
    png_size(out / R.FIG_ALPHA)  # the alpha figures show the convex runs only


# ------------------------------------------------- misplaced and duplicate run files

def test_misplaced_metrics_are_left_out_and_named(tmp_path, capsys):
    """The audit's case: a teacher's metrics.json copied over a KD run's."""
    exp, out = tmp_path / "experiments", tmp_path / "results"
    teacher = write_run(exp, "teacher", student="ResNet110", seed=0, best=74.0)
    kd = write_run(exp, "distill", method="kd", alpha=0.5, teacher="ResNet110",
                   student="ResNet20", seed=0, best=70.0)
    shutil.copy(exp / teacher / "metrics.json", exp / kd / "metrics.json")
    assert cli(exp, "--out", out, "--dpi", 10, "--curve-dpi", 10, "--jobs", 1) == 0
    rows = read_csv(out / R.TABLE_CSV)
    assert [(r["role"], r["n_seeds"], r["seeds"], r["best_std"]) for r in rows] == \
        [("teacher", "1", "0", "")]                 # not "2", "0 0", 0.0
    h = json.loads((out / R.HEALTH_JSON).read_text())
    (m,) = h["misplaced"]
    assert m["message"] == (f"misplaced: {kd}/metrics.json holds the metrics of the teacher "
                            f"run Cifar100/teachers/ResNet110/0")
    assert (h["counts"]["misplaced"], h["counts"]["complete"], h["duplicates"]) == (1, 1, [])
    assert f"misplaced: `{kd}/metrics.json` holds the metrics of the teacher run " \
           f"`Cifar100/teachers/ResNet110/0`" in (out / R.HEALTH_MD).read_text()
    assert "0 unreadable, 1 misplaced, 0 duplicate)" in capsys.readouterr().err
    # No curve is drawn for it either: it would show the teacher's history under the KD path.
    assert [p.name for p in (out / R.CURVES_DIR).iterdir()] == [R.curve_name(teacher)]
    # Also seen from the dataset's directory (paths of 3 and 4 components).
    rep = R.run_results(str(exp / "Cifar100"), str(tmp_path / "o"), curves=False, dpi=10,
                        log=lambda m: None)
    assert [(e["run"], e["claims"]) for e in rep["health"]["misplaced"]] == \
        [("kd/alpha_0.5/ResNet110_to_ResNet20/0", "Cifar100/teachers/ResNet110/0")]


def test_duplicate_identities_are_never_both_counted(tmp_path):
    exp = tmp_path / "experiments"
    placed = write_run(exp, "teacher", student="A", seed=0, best=74.0)
    shutil.copytree(exp / placed, exp / "Cifar100/backup/A_seed0")       # a copy: same claim
    kd = dict(method="kd", alpha=0.5, teacher="A", student="B", seed=1)
    for where in ("mine/x", "mine/y"):                  # two copies, neither in its directory
        write_run(tmp_path / "tmp", "distill", **kd, best=60.0)
        shutil.copytree(tmp_path / "tmp", exp / where / "copy")
        shutil.rmtree(tmp_path / "tmp")
    rep = R.run_results(str(exp), str(tmp_path / "o"), curves=False, dpi=10, log=lambda m: None)
    h = rep["health"]
    assert sorted((d["claims"], tuple(d["runs"]), d["used"]) for d in h["duplicates"]) == [
        ("Cifar100/kd/alpha_0.5/A_to_B/1",
         tuple(f"mine/{w}/copy/{run_rel('distill', 'Cifar100', **kd)}" for w in "xy"), None),
        ("Cifar100/teachers/A/0", ("Cifar100/backup/A_seed0", placed), placed)]
    assert (h["counts"]["duplicate"], h["counts"]["misplaced"], h["counts"]["complete"]) == (3, 0, 1)
    assert [(r["role"], r["n_seeds"]) for r in rep["rows"]] == [("teacher", 1)]
    md = (tmp_path / "o" / R.HEALTH_MD).read_text()
    assert f"the teacher run `Cifar100/teachers/A/0` is claimed by `Cifar100/backup/A_seed0`, " \
           f"`{placed}`: only `{placed}` used" in md


def test_other_layouts_are_not_flagged(tmp_path):
    """A correct tree seen from above (its trailing components are checked), a user's own
    layout, and older run blocks that leave fields out: nothing is flagged."""
    root = tmp_path / "all"
    write_run(root / "experiments", "teacher", student="A", seed=0, best=74.0)
    rel = write_run(root / "experiments", "distill", method="kd", alpha=0.5, teacher="A",
                    student="B", best=60.0)
    p = root / "experiments" / rel / "metrics.json"
    data = json.loads(p.read_text())
    del data["run"]["seed"], data["run"]["dataset"]   # an older writer
    p.write_text(json.dumps(data))
    write_run(tmp_path / "tmp", "student", student="B", seed=2, best=55.0)
    shutil.copytree(tmp_path / "tmp" / "Cifar100/none/B/2", root / "mine" / "plain-B")
    rep = R.run_results(str(root), str(tmp_path / "o"), curves=False, dpi=10, log=lambda m: None)
    assert (rep["health"]["misplaced"], rep["health"]["duplicates"]) == ([], [])
    assert rep["health"]["counts"]["complete"] == 3
    assert {r["role"] for r in rep["rows"]} == {"teacher", "student", "distill"}


def test_run_block_names_the_directory_the_grid_gives_it():
    """The run block that train.py records for every job of a grid names (runs.claimed_dir)
    that job's directory."""
    from kdlab.config import resolve_grid, resolve_run
    from kdlab.grid import expand_grid
    from kdlab.train import run_record

    grid = resolve_grid({"pairs": [{"teacher": "ResNet14", "student": "ResNet8"}],
                         "seeds": [0, 3], "teacher_seeds": [0, 2], "alphas": [0.5],
                         "methods": {"kd": {"alphas": [0.25, 1], "additive": [
                             {"ce_weight": 0.1, "kd_weight": 0.9}, {"ce_weight": 1, "kd_weight": 0}]},
                             "rkd": {}}})
    state = {"history": {"test_acc": [50.0]}, "teacher_acc": None, "resumed_at_epochs": []}
    jobs = [j for j in expand_grid(grid) if j.rule in ("train_teacher", "train_student", "distill")]
    assert len(jobs) == 2 + 2 + 2 * 5
    for job in jobs:
        block = run_record(resolve_run(job.run), "complete", state, 1, {}, 100)["run"]
        run_dir = os.path.relpath(os.path.dirname(job.outputs[0]), grid["experiments_dir"])
        assert R.runs.show_dir(R.runs.claimed_dir(json.loads(json.dumps(block)))) == run_dir


# ------------------------------------------- values for hostile or foreign run files

def test_run_without_accuracies_is_unreadable_not_a_seed_of_its_row(tmp_path):
    """A metrics.json without best_acc, last_acc or a test_acc history (not kdlab's) must
    not be counted in n_seeds while the means leave it out."""
    exp = tmp_path / "e"
    pair = dict(method="kd", alpha=0.5, teacher="ResNet56", student="ResNet20")
    values = [(70.4, 70.1), (71.0, 69.5), (69.2, 69.2)]
    for seed, (best, last) in enumerate(values):
        write_run(exp, "distill", **pair, seed=seed, best=best, last=last)
    foreign = Path(exp, write_run(exp, "distill", **pair, seed=3, best=99.0), "metrics.json")
    data = json.loads(foreign.read_text())
    for key in ("best_acc", "last_acc", "history"):
        del data[key]
    data["extra_key_of_another_tool"] = {"x": 1}
    foreign.write_text(json.dumps(data))
    summaries = R.load_runs(str(exp))[0]
    [row] = R.build_table(summaries, methods=["kd"])
    assert (row["n_seeds"], row["seeds"]) == (3, "0 1 2")
    assert row["best_mean"] == pytest.approx(statistics.mean(b for b, _ in values))
    assert row["last_std"] == pytest.approx(statistics.stdev(l for _, l in values))
    health = R.build_health(summaries)
    assert [e["run"] for e in health["unreadable"]] == [str(foreign.parent.relative_to(exp))]
    assert "best_acc and last_acc" in health["unreadable"][0]["error"]
    assert health["counts"]["complete"] == 3


def test_method_plus_kd_is_not_compared_with_the_method_alone(tmp_path):
    """config/crd.yaml runs CRD (ce 1, kd 0) and CRD+KD (ce 1, kd 1); the source's CRD number
    is CRD alone, so CRD+KD must neither be given it nor chosen for the comparison."""
    exp = tmp_path / "e"
    pair = dict(method="crd", teacher="ResNet56", student="ResNet20", training=CRD)
    alone, plus_kd = [(71.3, 71.1), (71.4, 70.9)], [(71.9, 71.7), (71.8, 71.6)]
    for setting, values in (("additive_ce1_kd0", alone), ("additive_ce1_kd1", plus_kd)):
        for seed, (best, last) in enumerate(values):
            write_run(exp, "distill", **pair, setting=setting, seed=seed, best=best, last=last)
    rows = {r["setting"]: r for r in R.build_table(R.load_runs(str(exp))[0], methods=["crd"])}
    last_alone = statistics.mean(l for _, l in alone)
    assert rows["additive_ce1_kd0"]["published"] == 71.16
    assert rows["additive_ce1_kd0"]["ours_minus_published"] == pytest.approx(last_alone - 71.16)
    assert math.isnan(rows["additive_ce1_kd1"]["published"])
    assert math.isnan(rows["additive_ce1_kd1"]["ours_minus_published"])
    compared = R.table_markdown(list(rows.values()), methods=["crd"]).split("## Compared")[1]
    ours = next(l for l in compared.splitlines() if "| ours |" in l)
    assert ours.endswith(f"| {last_alone:.2f} ± {statistics.stdev(l for _, l in alone):.2f} "
                         f"(additive ce1 kd0) |")
    assert f"| {last_alone - 71.16:+.2f} |".replace("-", "−") in compared


def test_a_row_mixing_recipes_says_so(tmp_path):
    """Seeds of another config written into the same experiments directory (or a grid half
    rerun after a change) land in the same row: its mean mixes them, and the row says so."""
    exp = tmp_path / "e"
    pair = dict(method="kd", alpha=0.5, teacher="ResNet56", student="ResNet20")
    for seed in range(3):
        write_run(exp, "distill", **pair, seed=seed, best=70.0 + seed, training=CRD)
        write_run(exp, "distill", **{**pair, "alpha": 0.9}, seed=seed, best=70.0, training=CRD)
    write_run(exp, "distill", **pair, seed=3, best=75.0, epochs=100, training={**CRD, "epochs": 100})
    rows = {r["setting"]: r for r in R.build_table(R.load_runs(str(exp))[0], methods=["kd"])}
    assert (rows["alpha_0.5"]["n_seeds"], rows["alpha_0.5"]["n_recipes"]) == (4, 2)
    assert (rows["alpha_0.9"]["n_seeds"], rows["alpha_0.9"]["n_recipes"]) == (3, 1)
    mixed = [70.0, 71.0, 72.0, 75.0]
    assert rows["alpha_0.5"]["best_mean"] == pytest.approx(statistics.mean(mixed))
    md = R.table_markdown(list(rows.values()), methods=["kd"])
    assert "| 4 ⚠ 2 recipes |" in md and "| 3 |" in md
    summary = md.split("## Summary")[1].split("## All runs")[0]
    assert f"| {statistics.mean(mixed):.2f} ± {statistics.stdev(mixed):.2f} (α 0.5) ⚠ |" in summary
    assert R.table_csv(list(rows.values())).splitlines()[1].endswith(",2")


def test_the_summary_says_when_a_best_setting_has_fewer_seeds(tmp_path):
    exp = tmp_path / "e"
    pair = dict(teacher="ResNet56", student="ResNet20")
    write_run(exp, "distill", method="kd", alpha=0.7, **pair, seed=0, best=55.33)  # best on one seed
    for seed in range(2):
        write_run(exp, "distill", method="kd", alpha=0.5, **pair, seed=seed, best=54.0 + seed)
        write_run(exp, "distill", method="rkd", alpha=0.5, **pair, seed=seed, best=50.0 + seed)
    write_run(exp, "distill", method="pkt", alpha=0.5, **pair, seed=0, best=52.0)  # its only setting
    methods = ["kd", "rkd", "pkt"]
    md = R.table_markdown(R.build_table(R.load_runs(str(exp))[0], methods=methods), methods=methods)
    summary = md.split("## Summary")[1].split("## All runs")[0]
    assert "| 55.33 (α 0.7, 1 seed) |" in summary
    assert f"| 50.50 ± {statistics.stdev([50.0, 51.0]):.2f} (α 0.5) | 52.00 (α 0.5) |" in summary


def test_the_summary_says_when_a_method_has_runs_not_complete(tmp_path):
    """rkd's alpha 0.5 still running: its best setting is alpha 0.9's only for now."""
    exp, out = tmp_path / "e", tmp_path / "out"
    pair = dict(teacher="ResNet56", student="ResNet20")
    write_run(exp, "distill", method="rkd", alpha=0.9, **pair, seed=0, best=17.67)
    write_run(exp, "distill", method="rkd", alpha=0.5, **pair, seed=0, best=30.0, status="running",
              progress_only=True, done=3)
    write_run(exp, "distill", method="kd", alpha=0.5, **pair, seed=0, best=20.0)
    write_run(exp, "distill", method="kd", alpha=0.5, **pair, seed=1, best=5.0, status="failed", error="guard")
    write_run(exp, "distill", method="pkt", alpha=0.5, **pair, seed=0, best=9.0, status="interrupted",
              progress_only=True, done=2)
    R.run_results(str(exp), str(out), dpi=60, curves=False, log=lambda m: None)
    summary = (out / R.TABLE_MD).read_text().split("## Summary")[1].split("## All runs")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| Cifar100"))
    cells = dict(zip([c.strip() for c in summary.splitlines()[2].split("|")], [c.strip() for c in row.split("|")]))
    assert cells["rkd"] == "17.67 (α 0.9; 1 run not complete)"
    assert cells["kd"] == "20.00 (α 0.5; 1 run not complete)"  # its failed seed
    assert cells["pkt"] == "– (1 run not complete)"
    assert cells["at"] == "–"


def test_a_bar_in_a_directory_name_stays_in_its_table_cell(tmp_path):
    exp = tmp_path / "e"
    write_run(exp, "distill", method="kd", teacher="ResNet56", student="ResNet20", setting="ce|kd", best=70.0)
    md = R.table_markdown(R.build_table(R.load_runs(str(exp))[0], methods=["kd"]), methods=["kd"])
    row = next(line for line in md.splitlines() if "ce" in line and line.startswith("| ResNet56"))
    assert "ce\\|kd" in row
    head = next(line for line in md.splitlines() if line.startswith("| Teacher → Student | Method"))
    # GitHub's Markdown splits a row at every "|" not preceded by a backslash.
    assert len(re.split(r"(?<!\\)\|", row)) == len(head.split("|"))
    # A method found in runs (not registered) is a column of the summary: its header too.
    write_run(exp, "distill", method="my|kd", alpha=0.5, teacher="ResNet56", student="ResNet20", best=60.0)
    md = R.table_markdown(R.build_table(R.load_runs(str(exp))[0], methods=["kd"]), methods=["kd"])
    head, rule = next((a, b) for a, b in zip(md.splitlines(), md.splitlines()[1:]) if a.startswith("| Dataset"))
    assert "my\\|kd" in head and len(re.split(r"(?<!\\)\|", head)) == len(rule.split("|"))


def test_markdown_says_which_runs_are_not_in_the_table(campaign):
    exp, out, values, planted, pair, report = campaign
    md = (out / R.TABLE_MD).read_text()
    n_incomplete, n_failed = len(planted["incomplete"]), len(planted["failed"])
    assert (n_incomplete, n_failed) == (3, 1)
    assert f"Not in the table (see health.md): {n_incomplete} incomplete, {n_failed} failed run file(s)." in md


def test_garbage_and_deeply_nested_run_files_are_unreadable_not_fatal(tmp_path):
    exp = tmp_path / "e"
    good = write_run(exp, "distill", method="kd", alpha=0.5, teacher="A", student="B", seed=0, best=61.0)
    for seed, raw in ((1, b"\xff\xfe\x00garbage"), (2, b"[" * 100_000)):
        d = exp / "Cifar100/kd/alpha_0.5/A_to_B" / str(seed)
        d.mkdir(parents=True)
        (d / "metrics.json").write_bytes(raw)
    summaries = R.load_runs(str(exp))[0]
    assert sorted(s["rel"] for s in summaries if s["state"] == "unreadable") == [
        "Cifar100/kd/alpha_0.5/A_to_B/1", "Cifar100/kd/alpha_0.5/A_to_B/2"]
    [row] = R.build_table(summaries, methods=["kd"])
    assert (row["n_seeds"], row["best_mean"]) == (1, 61.0) and good.endswith("/0")


def test_a_run_resumed_under_other_code_is_listed_as_mixed_code(tmp_path):
    """provenance.resumes records each process's code hash: a run whose epochs come from two
    code versions is named in the health list (it stays in the table), one resumed by the
    same code is not."""
    exp, out = tmp_path / "e", tmp_path / "r"
    pair = dict(method="kd", alpha=0.5, teacher="ResNet56", student="ResNet20")
    provenances = {0: {"code_sha256": "a" * 64, "resumes": []},
                   1: {"code_sha256": "a" * 64, "resumes": [{"epoch": 4, "code_sha256": "a" * 64}]},
                   2: {"code_sha256": "a" * 64, "resumes": [{"epoch": 4, "code_sha256": "a" * 64},
                                                            {"epoch": 9, "code_sha256": "b" * 64}]}}
    for seed, prov in provenances.items():
        rel = write_run(exp, "distill", **pair, seed=seed)
        path = exp / rel / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "provenance": prov}))
    R.run_results(str(exp), str(out), curves=False, dpi=10, log=lambda m: None)
    health = json.loads((out / R.HEALTH_JSON).read_text())
    assert health["counts"]["mixed_code"] == 1 and health["counts"]["complete"] == 3
    (entry,) = health["mixed_code"]
    assert entry["run"].endswith("/2") and entry["code_versions"] == 2 and entry["resumed_at"] == [4, 9]
    md = (out / R.HEALTH_MD).read_text()
    assert "## Trained by more than one code version" in md and "2 code versions, resumed at epoch(s) 4, 9" in md
    assert "| 3 |" in (out / R.TABLE_MD).read_text()  # all three seeds stay in the table
