"""Published accuracies (published.json) and which of our runs they can be compared with.

A group of runs (a table row) is compared with a source when the source reports the
row's dataset and every run of the row recorded the source's training recipe
(``runs.RECIPE_KEYS``: epochs, batch, lr and schedule, momentum, weight decay, label
smoothing, precision). An imported teacher (``kdlab import-teacher``) was not trained
here, so it matches on dataset and model alone: its row then checks that our test
accuracy of the released checkpoint reproduces the published one. The comparison uses
the source's own metric (the CRD paper reports the last epoch).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

PUBLISHED_PATH = Path(__file__).resolve().parent / "published.json"


@lru_cache(maxsize=None)
def load_sources(path: Path = PUBLISHED_PATH) -> tuple[dict, ...]:
    with open(path, encoding="utf-8") as fh:
        return tuple(json.load(fh)["sources"])


def _same(recorded, published) -> bool:
    if isinstance(published, list):
        return isinstance(recorded, list) and len(recorded) == len(published) and all(
            _same(r, p) for r, p in zip(recorded, published))
    if isinstance(published, (int, float)) and not isinstance(published, bool):
        try:
            return math.isclose(float(recorded), float(published), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return recorded == published


def matches(run: dict, source: dict) -> bool:
    """Whether one run summary has the source's dataset and recipe."""
    if str(run.get("dataset")) != source["dataset"]:
        return False
    if run.get("kind") == "teacher" and run.get("imported_from"):
        return True
    training = run.get("training") or {}
    return all(k in training and _same(training[k], v) for k, v in source["recipe"].items())


def source_of(group: list[dict], sources: tuple[dict, ...]) -> dict | None:
    """The first source that every run of the group matches."""
    return next((src for src in sources if group and all(matches(s, src) for s in group)), None)


def adds_kd_term(method: str, setting: str) -> bool:
    """Whether a distilled row's loss setting adds a KD term to a method other than KD
    (``additive_ce1_kd1``: CRD+KD, RepDistiller's ``-a 1``). The sources report each
    method alone, so such a row has no published number."""
    if method == "kd" or not setting.startswith("additive_ce") or "_kd" not in setting:
        return False
    try:
        return float(setting.rsplit("_kd", 1)[1]) != 0
    except ValueError:
        return False


def published_value(source: dict, role: str, teacher: str, student: str,
                    method: str, setting: str = "") -> float | None:
    if role == "distill" and adds_kd_term(method, setting):
        return None
    if role == "teacher":
        return source["teachers"].get(teacher)
    if role == "student":
        return source["students"].get(student)
    pair = next((p for p in source["pairs"]
                 if (p["teacher"], p["student"]) == (teacher, student)), None)
    return pair["methods"].get(method) if pair else None
