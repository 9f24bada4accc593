"""The health list: incomplete, failed, near-chance, outdated, mixed-code, unreadable,
misplaced and duplicate runs."""

from __future__ import annotations

import datetime as _dt
from typing import Callable

from ..runio import now
from .runs import KIND_WORDS, left_out


def chance_level(s: dict) -> float | None:
    try:
        n = int(s.get("num_classes") or 0)
    except (TypeError, ValueError):
        return None
    return 100.0 / n if n > 0 else None


def is_near_chance(s: dict, margin: float) -> bool:
    chance = chance_level(s)
    return (chance is not None and s.get("best_acc") is not None
            and s["best_acc"] <= chance + margin)


def outdated_version(s: dict, method_versions: dict | None) -> int | None:
    """The current version if this run was made with an older one, else None."""
    if not method_versions or s.get("state") == "unreadable":
        return None
    method = s.get("version_method") or s.get("method")
    current = method_versions.get(method)
    if current is None:
        return None
    have = s.get("method_version")
    try:
        if have is not None and int(have) >= int(current):
            return None
    except (TypeError, ValueError):
        pass
    return current


def kind_word(kind) -> str:
    return KIND_WORDS.get(kind, str(kind))


def build_health(summaries: list[dict], chance_margin: float = 5.0,
                 method_versions: dict | None = None) -> dict:
    incomplete, failed, near, outdated, unreadable, misplaced, mixed_code = [], [], [], [], [], [], []
    duplicates: dict[tuple, dict] = {}
    for s in summaries:
        rel, state = s["rel"], s.get("state")
        if state == "unreadable":
            unreadable.append({"run": rel, "error": s.get("error")})
            continue
        if s.get("duplicates"):
            group = s["duplicates"]
            duplicates.setdefault(tuple(group["runs"]), group)
        # A run not used is listed only as such: its other findings would be put on the
        # wrong run.
        why = left_out(s)
        if why == "misplaced":
            entry = {"run": rel, "file": s.get("file"), "claims": s["misplaced"],
                     "kind": s.get("kind"),
                     "holds": "metrics" if s.get("file") == "metrics.json" else "progress"}
            entry["message"] = misplaced_message(entry)
            misplaced.append(entry)
        if why:
            continue
        if state == "failed":
            failed.append({"run": rel, "error": s.get("error"),
                           "epochs_done": s.get("epochs_done"),
                           "epochs_planned": s.get("epochs_planned")})
        elif state in ("running", "finishing", "interrupted"):
            incomplete.append({
                "run": rel, "status": state, "error": s.get("error"), "epochs_done": s.get("epochs_done"),
                "epochs_planned": s.get("epochs_planned"), "best_acc": s.get("best_acc"),
                "last_update": _dt.datetime.fromtimestamp(s["mtime"]).astimezone()
                .isoformat(timespec="seconds") if s.get("mtime") else None})
        if state == "complete" and is_near_chance(s, chance_margin):
            near.append({"run": rel, "best_acc": s["best_acc"], "chance": chance_level(s),
                         "num_classes": s.get("num_classes")})
        if len(s.get("code_sha256s") or []) > 1:
            mixed_code.append({"run": rel, "state": state, "code_versions": len(s["code_sha256s"]),
                               "resumed_at": s.get("resumed_at")})
        cur = outdated_version(s, method_versions)
        if cur is not None:
            outdated.append({"run": rel, "method": s.get("version_method") or s.get("method"),
                             "method_version": s.get("method_version"),
                             "current_version": cur, "state": state})
    return {
        "generated": now(), "chance_margin": chance_margin,
        "method_versions": method_versions,
        "counts": {"runs": len(summaries),
                   "complete": sum(s.get("state") == "complete" and not left_out(s)
                                   for s in summaries),
                   "incomplete": len(incomplete), "failed": len(failed),
                   "near_chance": len(near), "outdated": len(outdated), "mixed_code": len(mixed_code),
                   "unreadable": len(unreadable), "misplaced": len(misplaced),
                   "duplicate": sum(left_out(s) == "duplicate" for s in summaries)},
        "incomplete": incomplete, "failed": failed, "near_chance": near,
        "outdated": outdated, "mixed_code": mixed_code, "unreadable": unreadable, "misplaced": misplaced,
        "duplicates": list(duplicates.values()),
    }


def misplaced_message(e: dict, quote: str = "") -> str:
    return (f"misplaced: {quote}{e['run']}/{e['file']}{quote} holds the {e['holds']} of the "
            f"{kind_word(e['kind'])} run {quote}{e['claims']}{quote}")


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

    section("Incomplete (running, interrupted, or progress file only)", h["incomplete"],
            lambda e: f"`{e['run']}`: {e['status']}, {epochs(e)}"
            + (f", best so far {e['best_acc']:.2f}%" if e.get("best_acc") is not None else "")
            + f", last update {e['last_update']}" + (f": {e['error']}" if e.get("error") else ""))
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
    section("Trained by more than one code version (resumed after kdlab or torch changed; "
            "`provenance.resumes` says which epochs)", h["mixed_code"],
            lambda e: f"`{e['run']}` ({e['state']}): {e['code_versions']} code versions, resumed at epoch(s) "
                      f"{', '.join(str(x) for x in e['resumed_at'])}")
    section("Unreadable run files", h["unreadable"], lambda e: f"`{e['run']}`: {e['error']} (delete the file and run "
            f"snakemake again, which writes it anew: a finished run's from its checkpoint, without training)")
    section("Misplaced run files (the run block names another run; not used)", h["misplaced"],
            lambda e: misplaced_message(e, quote="`"))
    section("Duplicate runs (one run claimed by several run files; at most the one in its "
            "own directory is used)", h["duplicates"],
            lambda e: f"the {kind_word(e['kind'])} run `{e['claims']}` is "
                      f"claimed by " + ", ".join(f"`{r}`" for r in e["runs"]) + ": "
                      + (f"only `{e['used']}` used" if e["used"] else "none used"))
    return "\n".join(lines)
