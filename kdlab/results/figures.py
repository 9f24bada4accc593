"""Figures: accuracy against alpha, each method at its best setting, per-run curves.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display). Every figure's
title says which epoch's accuracy it shows.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Iterable

from ..runio import atomic_write_bytes
from .health import chance_level
from .runs import num, series, setting_label
from .table import method_order, method_sort_key, metric_words

# Okabe-Ito (colour-blind safe) first, then more; with a marker each, so that prints
# in grey still work. A method keeps its colour in every figure: it is chosen by the
# method's place in the registry. Neither the teacher's black nor the student's grey.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#8C564B",
           "#9467BD", "#BCBD22", "#17BECF", "#B2182B", "#E377C2", "#F0E442", "#1F3A93",
           "#A6761D", "#66A61E"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "*", "p", "d", "H", "8", "1"]
# Bump when the drawing code changes: every figure is then redrawn.
STYLE_VERSION = 5
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


class MethodStyle:
    """Colour/marker per method: registered methods by their registry place, then the
    others (found in runs only) in name order."""

    def __init__(self, order: list[str], methods: Iterable[str] = ()):
        names = method_order(order, methods)
        self._style = {m: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)])
                       for i, m in enumerate(names)}
        self.order = names

    def colour(self, method: str) -> str:
        return self._style.get(method, ("#333333", "o"))[0]

    def marker(self, method: str) -> str:
        return self._style.get(method, ("#333333", "o"))[1]

    def sort_key(self, method: str) -> tuple:
        return method_sort_key(method, self.order)


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
        # A published number only where the source reports this figure's metric.
        pub = r["published"] if r["published_metric"] == metric else None
        point = {"mean": f(r[m]), "std": f(r[sd]), "n": r["n_seeds"], "published": f(pub)}
        if r["role"] == "teacher":
            p["teacher_acc"] = point
        elif r["role"] == "student":
            p["student_acc"] = point
        elif point["mean"] is not None:
            p["methods"].setdefault(r["method"], []).append(
                {"setting": r["setting"], "alpha": r["alpha"], **point})
    return [p for p in panels.values() if p["methods"]]


def _grid(n: int, ncols_max: int = 3) -> tuple[int, int]:
    ncols = min(ncols_max, max(1, n))
    return (n + ncols - 1) // ncols, ncols


def _panel_figure(panels: list[dict], column_width: float, row_height: float, extra_height: float = 0.0):
    """(figure, its columns, a subplot per (dataset, pair) panel titled with it), at most
    three panels a row."""
    nrows, ncols = _grid(len(panels))
    fig = _figure(column_width * ncols, row_height * nrows + extra_height)
    axes = []
    for i, p in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_title(f"{p['dataset']}: {p['teacher'] or '?'} → {p['student'] or '?'}")
        axes.append(ax)
    return fig, ncols, axes


def draw_accuracy_vs_alpha(panels: list[dict], path: str, dpi: int, metric: str,
                           style: MethodStyle) -> None:
    title = (f"Test accuracy vs. α ({metric_words(metric)} accuracy; mean ± 1 s.d. over seeds; "
             f"convex form (1 − α)·CE + α·L only)")
    if not panels:
        _placeholder(path, title, dpi)
        return
    from matplotlib.lines import Line2D
    with _rc():
        fig, ncols, axes = _panel_figure(panels, 4.2, 3.3, extra_height=0.6)
        handles: dict[str, Any] = {}
        for ax, p in zip(axes, panels):
            alphas_all = set()
            for method in sorted(p["methods"], key=style.sort_key):
                pts = sorted((q for q in p["methods"][method] if q["alpha"]),
                             key=lambda q: float(q["alpha"]))
                if not pts:
                    continue
                xs = [float(q["alpha"]) for q in pts]
                ys = [q["mean"] for q in pts]
                es = [q["std"] if q["std"] is not None else 0.0 for q in pts]
                alphas_all.update(xs)
                c = style.colour(method)
                h = ax.errorbar(xs, ys, yerr=es, color=c, marker=style.marker(method),
                                markersize=4.5, capsize=2.5, elinewidth=0.9,
                                label=method)
                lo = [y - e for y, e in zip(ys, es)]
                hi = [y + e for y, e in zip(ys, es)]
                ax.fill_between(xs, lo, hi, color=c, alpha=0.12, linewidth=0)
                handles.setdefault(method, h)
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
        fig.suptitle(title)
        fig.tight_layout()
        # Below the panels (outside the figure box; the tight bbox at save takes it in).
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center",
                   ncol=min(len(handles), 3 * ncols), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        _save(fig, path, dpi)


def draw_methods_at_best_alpha(panels: list[dict], path: str, dpi: int, metric: str,
                               style: MethodStyle) -> None:
    title = (f"Each method at its best setting ({metric_words(metric)} accuracy; mean ± 1 s.d. "
             f"over seeds; × published, where a source reports the {metric_words(metric)})")
    if not panels:
        _placeholder(path, title, dpi)
        return
    with _rc():
        fig, _, axes = _panel_figure(panels, max(4.2, 0.9 * (2 + max(len(p["methods"]) for p in panels)) + 1.2), 3.4)
        for ax, p in zip(axes, panels):
            bars = []  # (label, mean, std, colour, annotation, published or None)
            if p["student_acc"] and p["student_acc"]["mean"] is not None:
                bars.append(("Student", p["student_acc"]["mean"], p["student_acc"]["std"],
                             STUDENT_COLOUR, "", p["student_acc"]["published"]))
            for method in sorted(p["methods"], key=style.sort_key):
                best = max(p["methods"][method], key=lambda q: q["mean"])  # first of equals
                bars.append((method, best["mean"], best["std"], style.colour(method),
                             setting_label(best["setting"]), best["published"]))
            if p["teacher_acc"] and p["teacher_acc"]["mean"] is not None:
                bars.append(("Teacher", p["teacher_acc"]["mean"], p["teacher_acc"]["std"],
                             TEACHER_COLOUR, "", p["teacher_acc"]["published"]))
            xs = list(range(len(bars)))
            means = [b[1] for b in bars]
            errs = [b[2] or 0.0 for b in bars]
            ax.bar(xs, means, yerr=errs, color=[b[3] for b in bars], capsize=3,
                   width=0.7, error_kw={"elinewidth": 0.9})
            pubs = [(x, b[5]) for x, b in zip(xs, bars) if b[5] is not None]
            if pubs:
                ax.plot([x for x, _ in pubs], [v for _, v in pubs], ls="none", marker="x",
                        color="#C00000", markersize=6, mew=1.5, zorder=5)
            lo = min([m - e for m, e in zip(means, errs)] + [v for _, v in pubs])
            hi = max([m + e for m, e in zip(means, errs)] + [v for _, v in pubs])
            span = max(hi - lo, 1.0)
            ymin = max(0.0, float(math.floor(lo - 0.35 * span)))
            ax.set_ylim(ymin, hi + 0.25 * span)
            for x, (label, mean, std, colour, note, _) in zip(xs, bars):
                text = f"{mean:.1f}" + (f"\n{note}" if note else "")
                ax.text(x, mean + (std or 0.0) + 0.02 * span, text, ha="center",
                        va="bottom", fontsize=7)
            ax.set_xticks(xs)
            ax.set_xticklabels([b[0] for b in bars], rotation=45 if len(bars) > 8 else 0)
            # Bars do not start at 0 when the differences are small: the label says so.
            ax.set_ylabel("Test accuracy (%)" if ymin <= 0 else
                          f"Test accuracy (%; axis starts at {ymin:.3g})")
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
        what = (f"{s.get('method') or '?'} {setting_label(s.get('setting') or '')}: "
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
            ys = series(raw)
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
                              color=PALETTE[(i + 4) % len(PALETTE)])
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
        chance = chance_level(s)
        if chance is not None:
            ax_acc.axhline(chance, color="#999999", ls=":", lw=1, label=f"chance ({chance:.3g}%)")
        if s.get("teacher_acc") is not None:
            ax_acc.axhline(num(s["teacher_acc"]), color=TEACHER_COLOUR, ls="--", lw=1,
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
        skipped = series(hist.get("skipped_steps"))
        nonfinite = series(hist.get("nonfinite_losses"))
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
