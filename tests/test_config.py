"""The grid config: its documentation, the shipped configs, and the rejection of bad
configs (in Python, through `kdlab check-config` and through Snakemake)."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main as kdlab_main
from kdlab.config import ConfigError, grid_schema, load_grid, read_yaml, resolve_grid, resolve_run
from kdlab.grid import expand_grid
from kdlab.methods import METHODS

from test_data import write_cifar

REPO = Path(__file__).resolve().parent.parent
README = REPO / "config" / "README.md"
SHIPPED = ["config.yaml", "demo.yaml", "crd.yaml"]


def read_config(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def demo(**top):
    config = read_config("demo.yaml")
    config.update(copy.deepcopy(top))
    return config


# --- the documentation covers every key -------------------------------------------

def schema_keys():
    """{dotted key: schema node} for every key of the grid, per-method settings included."""
    schema = grid_schema()

    def resolve(node):
        while "$ref" in node:  # a sibling default (e.g. experiments_dir) wins over the $ref's
            target = schema["$defs"][node["$ref"].split("/")[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    keys = {}

    def walk(node, prefix):
        node = resolve(node)
        for name, sub in node.get("properties", {}).items():
            keys[prefix + name] = resolve(sub)
            walk(sub, prefix + name + ".")
        items = resolve(node.get("items", {}))
        if "properties" in items:
            walk(items, prefix[:-1] + "[].")

    walk(schema, "")
    return keys


def readme_rows():
    """{key: default cell} from every Markdown table of config/README.md whose first
    cell is one `key` (the default cell is None in tables without a default column)."""
    rows, default_col = {}, None
    for line in README.read_text().splitlines():
        if not line.startswith("|"):
            default_col = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "key":  # a header row
            default_col = cells.index("default") if "default" in cells else None
            continue
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        if match:
            rows[match.group(1)] = cells[default_col] if default_col is not None else None
    return rows


def test_schema_walk_sees_every_level():
    keys = schema_keys()
    for key in ("data.synthetic.seed", "resources.runtime.distill", "pairs[].student", "teacher_training",
                "methods.kd.temperature", "methods.fitnets.hint_layer", "methods.rkd.angle",
                "methods.ft.paraphraser_lr", "methods.ft.alphas", "training.max_skipped_steps"):
        assert key in keys
    assert len(keys) > 60


def generic_method_key(key):
    """methods.<name>.alphas and .additive[...] of every method are documented once, as methods.<name>.*"""
    return re.sub(r"^methods\.[a-z0-9_]+\.(?=alphas$|additive)", "methods.<name>.", key)


def test_readme_documents_every_key_with_its_default():
    rows = readme_rows()
    rows.update({key: rows[generic_method_key(key)] for key in schema_keys() if generic_method_key(key) in rows})
    missing = [key for key in schema_keys() if key not in rows]
    assert not missing, f"config/README.md has no table row for: {', '.join(missing)}"
    wrong = []
    for key, node in schema_keys().items():
        if "default" in node and rows[key] is not None:
            cell = re.fullmatch(r"`([^`]*)`", rows[key])
            if cell is None or yaml.safe_load(cell.group(1)) != node["default"]:
                wrong.append(f"{key}: README says {rows[key]}, the schema {node['default']!r}")
    assert not wrong, "stale defaults in config/README.md:\n" + "\n".join(wrong)


ALL_METHODS = set(METHODS) - {"none"}
SERVED_FROM_CACHE = {n for n, m in METHODS.items() if getattr(m, "TEACHER_OUTPUTS", None) == "logits+embedding"}
LIVE_FEATURES = {n for n, m in METHODS.items() if m.NEEDS_TEACHER} - SERVED_FROM_CACHE
COMPILED_DETACHED = {n for n, m in METHODS.items() if getattr(m, "STUDENT_OUTPUTS", None) == "logits+embedding"}
METHOD_LISTS = [  # (file, text before the list, text after it, the methods it must name)
    ("README.md", "distils students with every method (", ")", ALL_METHODS),
    ("README.md", "per method in `kdlab/methods/` (", ";", ALL_METHODS),
    ("README.md", '`TEACHER_OUTPUTS = "logits+embedding"` (', ")", SERVED_FROM_CACHE),
    ("README.md", "of running the teacher; ", " need intermediate features", LIVE_FEATURES),
    ("README.md", '`STUDENT_OUTPUTS = "logits+embedding"`: ', " and plain", COMPILED_DETACHED - {"none"}),
    ("config/README.md", "the methods to run: any of ", " (below)", ALL_METHODS),
    ("config/README.md", "also decides whether the runs of ", " read the cache", SERVED_FROM_CACHE),
    ("config/README.md", "logits and embedding read them (", ": each module", SERVED_FROM_CACHE),
]


@pytest.mark.parametrize("file,before,after,expected", METHOD_LISTS,
                         ids=[f"{file}: {before.strip(' (')}" for file, before, *_ in METHOD_LISTS])
def test_docs_list_the_registered_methods(file, before, after, expected):
    """The method lists written out in the docs name exactly the registered methods of their kind."""
    text = (REPO / file).read_text()
    assert text.count(before) == 1, f"{file}: {before!r} should appear once"
    listed = text.split(before)[1].split(after)[0]
    names = {word.lower() for word in re.findall(r"[A-Za-z]+", listed)} - {"and", "the", "baselines"}
    assert names == expected, (f"{file}: the list after {before!r} should also name {sorted(expected - names)} "
                               f"and not {sorted(names - expected)}")


def test_readme_names_the_runtime_keys():
    from kdlab.config import RUNTIME_KEYS
    text = README.read_text()
    for block, keys in RUNTIME_KEYS.items():
        for key in keys:
            assert f"`{block}.{key}`" in text


# --- the shipped configs ----------------------------------------------------------

def expected_counts(grid):
    teachers = {p["teacher"] for p in grid["pairs"]}
    students = {p["student"] for p in grid["pairs"]}
    counts = {"train_teacher": len(teachers) * len(grid["teacher_seeds"])}
    if "ft" in grid["methods"]:
        counts["pretrain_paraphraser"] = len(teachers)
    if grid["plain_students"]:
        counts["train_student"] = len(students) * len(grid["seeds"])
    if grid["training"]["teacher_cache"] and any(m in SERVED_FROM_CACHE for m in grid["methods"]):
        counts["cache_teacher"] = len(teachers)
    distill = sum(len(block.get("alphas", [] if "additive" in block else grid["alphas"])) +
                  len(block.get("additive", [])) for block in grid["methods"].values())
    if distill:
        counts["distill"] = distill * len(grid["pairs"]) * len(grid["seeds"])
    return counts


def documented_counts(name):
    """The jobs config/README.md's table of the shipped configs gives for `name`, in its column's order:
    teachers, paraphrasers, plain students, teacher caches, distilled students."""
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{name}` |"))
    numbers = [int(n) for n in re.findall(r"\d+", row.split("|")[-2])]
    rules = ("train_teacher", "pretrain_paraphraser", "train_student", "cache_teacher", "distill")
    return {rule: n for rule, n in zip(rules, numbers, strict=True) if n}


def published_methods():
    sources = json.loads((REPO / "kdlab" / "results" / "published.json").read_text())["sources"]
    return {m for source in sources for pair in source["pairs"] for m in pair["methods"]} & set(METHODS)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_validates_and_expands(name):
    raw = read_config(name)
    grid = load_grid(REPO / "config" / name)
    counts = Counter(job.rule for job in expand_grid(grid))
    assert counts == expected_counts(grid)
    assert counts == documented_counts(name), f"config/README.md's table of the shipped configs: update {name}'s jobs"
    assert {"kd", "fitnets", "rkd", "ft"} <= set(raw["methods"])
    if name == "demo.yaml":
        assert set(raw["methods"]) == set(METHODS) - {"none"}, "the demo runs every registered method"
    if name == "crd.yaml":  # every method with a published number to compare with
        assert set(raw["methods"]) >= published_methods()


def test_expansion_follows_the_grid():
    grid = resolve_grid(demo(plain_students=False, seeds=[3], teacher_seeds=[0, 1], teacher_seed=1,
                             methods={"kd": {"alphas": [0.1, 0.2, 0.3]}, "rkd": {}}))
    counts = Counter(job.rule for job in expand_grid(grid))
    assert counts == expected_counts(grid) == {"train_teacher": 2, "distill": 3 + 2}  # the demo builds no cache
    distilled = [job for job in expand_grid(grid) if job.rule == "distill"]
    assert all(job.run["teacher_weights"].endswith("/teachers/ResNet14/1/model.pth") for job in distilled)


def test_convex_and_additive_runs_live_apart():
    grid = resolve_grid(demo(plain_students=False, seeds=[0], alphas=[0.5], methods={
        "kd": {"alphas": [0.9], "additive": [{"ce_weight": 0.1, "kd_weight": 0.9}]},
        "rkd": {"additive": [{"ce_weight": 1, "kd_weight": 0}, {"ce_weight": 1, "kd_weight": 1, "kd_temperature": 2}]},
        "fitnets": {}}))
    runs = {job.outputs[0].split("/")[2] + "/" + job.outputs[0].split("/")[3]: job.run
            for job in expand_grid(grid) if job.rule == "distill"}
    assert set(runs) == {"kd/alpha_0.9", "kd/additive_ce0.1_kd0.9", "rkd/additive_ce1_kd0", "rkd/additive_ce1_kd1",
                         "fitnets/alpha_0.5"}  # rkd lists only additive recipes: no global alphas
    assert runs["kd/alpha_0.9"]["alpha"] == 0.9 and "additive" not in runs["kd/alpha_0.9"]
    assert "alpha" not in runs["kd/additive_ce0.1_kd0.9"]
    assert runs["kd/additive_ce0.1_kd0.9"]["additive"] == {"ce_weight": 0.1, "kd_weight": 0.9}
    assert runs["rkd/additive_ce1_kd0"]["additive"] == {"ce_weight": 1, "kd_weight": 0, "kd_temperature": 4.0}
    assert runs["rkd/additive_ce1_kd1"]["additive"]["kd_temperature"] == 2
    assert all("additive" not in run["method_settings"] for run in runs.values())
    with pytest.raises(ConfigError, match="config key 'additive': only a distilled student"):
        resolve_run({**runs["kd/additive_ce0.1_kd0.9"], "alpha": 0.5})


@pytest.mark.parametrize("blocks", [{}, {"data": {}, "training": {}, "resources": {}}], ids=["omitted", "empty"])
def test_missing_blocks_take_their_defaults(blocks):
    grid = resolve_grid({"pairs": [{"teacher": "ResNet14", "student": "ResNet8"}], **blocks})
    assert grid["training"]["epochs"] == 240 and grid["data"]["dataset"] == "Cifar100"
    assert grid["resources"]["runtime"]["distill"] == 600 and grid["resources"]["threads"] == 4
    assert grid["experiments_dir"] == "experiments"
    assert grid["methods"] == {} and grid["teacher_training"] == {}
    assert Counter(j.rule for j in expand_grid(grid)) == {"train_teacher": 1, "train_student": 3}


# --- bad configs ------------------------------------------------------------------

def set_in(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value
    return config


BAD = {  # name: (dotted key, value set in demo.yaml, the key the message must name, text it must contain)
    "unknown method": ("methods.crdd", {}, "methods", "'crdd'"),
    "additive without kd_weight": ("methods.rkd.additive", [{"ce_weight": 1}], "methods.rkd.additive[0]",
                                   "'kd_weight' is a required property"),
    "additive negative ce_weight": ("methods.rkd.additive", [{"ce_weight": -1, "kd_weight": 0}],
                                    "methods.rkd.additive[0].ce_weight", "minimum"),
    "additive kd_temperature for kd": ("methods.kd.additive",
                                       [{"ce_weight": 0.1, "kd_weight": 0.9, "kd_temperature": 4}],
                                       "methods.kd.additive[0]", "'kd_temperature' was unexpected"),
    "additive same directory": ("methods.rkd.additive", [{"ce_weight": 1, "kd_weight": 0},
                                                         {"ce_weight": 1.0, "kd_weight": 0, "kd_temperature": 2}],
                                "methods.rkd.additive", "kd_temperature is not part of the name"),
    "additive kd with no loss": ("methods.kd.additive", [{"ce_weight": 0, "kd_weight": 0}], "methods.kd.additive",
                                 "trains on a loss of exactly 0"),
    "additive weight with exponent": ("methods.rkd.additive", [{"ce_weight": 1e-7, "kd_weight": 0}],
                                      "methods.rkd.additive", "plain decimals"),
    "additive empty": ("methods.rkd.additive", [], "methods.rkd.additive", "non-empty"),
    "unknown method none": ("methods.none", {}, "methods", "'none'"),
    "misspelt method names the known ones": ("methods.kdd", {}, "methods",
                                             "('kdd' was unexpected); known keys: kd, fitnets, rkd, ft, at,"),
    "misspelt setting names the known ones": ("methods.kd.tempreature", 4, "methods.kd",
                                              "known keys: temperature, alphas, additive"),
    "unknown teacher": ("pairs.0.teacher", "ResNet1000", "pairs[0].teacher", "unknown model 'ResNet1000'"),
    "unknown student": ("pairs.0.student", "ResNet9", "pairs[0].student", "unknown model 'ResNet9'"),
    "alpha above 1": ("alphas", [0.5, 1.5], "alphas[1]", "1.5"),
    "alpha below 0": ("alphas", [-0.1], "alphas[0]", "-0.1"),
    "method alpha above 1": ("methods.kd.alphas", [1.01], "methods.kd.alphas[0]", "1.01"),
    "method alpha below 0": ("methods.rkd.alphas", [0.5, -0.5], "methods.rkd.alphas[1]", "-0.5"),
    "empty alphas": ("alphas", [], "alphas", "non-empty"),
    "fitnets layers": ("methods.fitnets", {"guided_layer": 0, "hint_layer": 2}, "methods.fitnets",
                       "guided_layer 0"),
    "fitnets layer range": ("methods.fitnets.hint_layer", 3, "methods.fitnets.hint_layer", "3"),
    "boolean in lower case from --config": ("plain_students", "false", "plain_students",
                                            "snakemake --config reads only True and False as booleans: write False"),
    "zero epochs": ("training.epochs", 0, "training.epochs", "minimum"),
    "negative epochs": ("training.epochs", -5, "training.epochs", "minimum"),
    "negative teacher epochs": ("teacher_training.epochs", -1, "teacher_training.epochs", "minimum"),
    "zero paraphraser epochs": ("methods.ft.paraphraser_epochs", 0, "methods.ft.paraphraser_epochs", "minimum"),
    "model name with /": ("pairs.0.student", "ResNet8/../x", "pairs[0].student", "is not allowed here"),
    "model name with space": ("pairs.0.student", "ResNet 8", "pairs[0].student", "is not allowed here"),
    "model name with ;": ("pairs.0.teacher", "ResNet14;rm", "pairs[0].teacher", "is not allowed here"),
    "model name with $(": ("pairs.0.teacher", "$(reboot)", "pairs[0].teacher", "is not allowed here"),
    "experiments_dir with ;": ("experiments_dir", "exp;touch x", "experiments_dir", "is not allowed here"),
    "experiments_dir with $(": ("experiments_dir", "exp$(id)", "experiments_dir", "is not allowed here"),
    "results_dir with backquote": ("results_dir", "res`id`", "results_dir", "is not allowed here"),
    "data_dir with quote": ("data.data_dir", "da'ta", "data.data_dir", "is not allowed here"),
    "unknown top-level key": ("epochs", 3, "(top level)", "'epochs' was unexpected"),
    "unknown training key": ("training.epoch", 3, "training", "'epoch' was unexpected"),
    "unknown teacher_training key": ("teacher_training.lrate", 0.1, "teacher_training", "'lrate' was unexpected"),
    "unknown method key": ("methods.kd.temp", 3, "methods.kd", "'temp' was unexpected"),
    "unknown data key": ("data.synthetic.classes", 3, "data.synthetic", "'classes' was unexpected"),
    "unknown resources key": ("resources.runtime.train", 3, "resources.runtime", "'train' was unexpected"),
    "unknown pair key": ("pairs.0.assistant", "ResNet8", "pairs[0]", "'assistant' was unexpected"),
    "teacher_seed not trained": ("teacher_seed", 1, "teacher_seed", "teacher_seeds"),
    "npz without npz_path": ("data.dataset", "npz", "data.npz_path", "npz"),
    "unknown dataset": ("data.dataset", "cifar100", "data.dataset", "'cifar100'"),
    "another dataset's key": ("data.dataset", "Cifar100", "data.synthetic", "only dataset Synthetic reads it"),
    "milestone twice": ("training.milestones", [2, 2], "training.milestones", "non-unique"),
    "epochs beyond bound": ("training.epochs", 10 ** 400, "training.epochs", "is greater than the maximum"),
    "workers beyond bound": ("training.num_workers", 100000, "training.num_workers", "is greater than the maximum"),
    "YAML 1.1 exponent": ("training.lr", "1e-3", "training.lr", "1.0e-3"),
    "YAML boolean for a word": ("training.amp", False, "training.amp", "quote the word"),
    "--config list as a string": ("seeds", "[0, 1]", "seeds", "second --configfile"),
    "output dir is a file": ("experiments_dir", __file__, "experiments_dir", "is a file, not a directory"),
    "output dir inside a file": ("results_dir", __file__ + "/results", "results_dir", "is a file, not a directory"),
    "a quoted number": ("training.epochs", "3", "training.epochs", "remove the quotes; snakemake --config passes the "
                        "values inside a list or a mapping as strings"),
    "seeds not a list": ("seeds", 0, "seeds", "not of type 'array'"),
    "duplicate seeds": ("seeds", [0, 0], "seeds", "non-unique"),
    "epochs as a string": ("training.epochs", "240", "training.epochs", "not of type 'integer'"),
    "epochs as a bool": ("training.epochs", True, "training.epochs", "not of type 'integer'"),
    "lr as a string": ("training.lr", "fast", "training.lr", "not of type 'number'"),
    "download as a string": ("data.download", "yes", "data.download", "not of type 'boolean'"),
    "amp off unquoted": ("training.amp", False, "training.amp", "is not one of"),
    "methods as a list": ("methods", ["kd"], "methods", "not of type 'object'"),
    "method settings null": ("methods.kd", None, "methods.kd", "not of type 'object'"),
    "temperature as a string": ("methods.kd.temperature", "4", "methods.kd.temperature", "not of type 'number'"),
    "pairs empty": ("pairs", [], "pairs", "non-empty"),
    "teacher_training not a mapping": ("teacher_training", [1], "teacher_training", "not of type 'object'"),
    # Reliability (issue 10): NaN and infinity compare false against every bound.
    **{f"{key} {name}": (key, value, key, "finite number")
       for key in ("training.lr", "training.momentum", "training.weight_decay", "training.label_smoothing",
                   "training.lr_decay", "teacher_training.lr", "methods.kd.temperature", "methods.fitnets.weight",
                   "methods.ft.rate", "methods.rkd.angle_weight")
       for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf")))},
    "alpha nan": ("alphas", [0.5, float("nan")], "alphas[1]", "finite number"),
    "lr absurd": ("training.lr", 1e30, "training.lr", "maximum"),
    "temperature tiny": ("methods.kd.temperature", 1e-30, "methods.kd.temperature", "minimum"),
    "experiments_dir leading dash": ("experiments_dir", "-exp", "experiments_dir", "not starting with -"),
    "results_dir leading dash": ("results_dir", "-res", "results_dir", "is not allowed here"),
    "data_dir leading dash": ("data.data_dir", "--help", "data.data_dir", "is not allowed here"),
    "experiments_dir with braces": ("experiments_dir", "exp{x}", "experiments_dir", "braces"),
    "results_dir with a brace": ("results_dir", "res}", "results_dir", "is not allowed here"),
    "experiments_dir with a final newline": ("experiments_dir", "exp\n", "experiments_dir", "control characters"),
    "results_dir with a newline": ("results_dir", "a\nb", "results_dir", "control characters"),
    "data_dir with a tab": ("data.data_dir", "da\tta", "data.data_dir", "control characters"),
    "model name with a final newline": ("pairs.0.student", "ResNet8\n", "pairs[0].student", "control characters"),
    "duplicate pair": ("pairs", [{"teacher": "ResNet14", "student": "ResNet8"},
                                 {"teacher": "ResNet20", "student": "ResNet8"},
                                 {"teacher": "ResNet14", "student": "ResNet8"}], "pairs[2]", "repeats pairs[0]"),
    "negative crop padding": ("data.augmentation.crop_padding", -1, "data.augmentation.crop_padding", "minimum"),
    "crop padding too large": ("data.augmentation.crop_padding", 40, "data.augmentation.crop_padding", "maximum"),
    "horizontal_flip as a string": ("data.augmentation.horizontal_flip", "no", "data.augmentation.horizontal_flip",
                                    "not of type 'boolean'"),
}


def bad_config(name):
    dotted, value, _, _ = BAD[name]
    return set_in(demo(), dotted, copy.deepcopy(value))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_is_rejected_naming_the_key(name):
    _, _, key, text = BAD[name]
    with pytest.raises(ConfigError) as error:
        resolve_grid(bad_config(name))
    message = str(error.value)
    assert f"config key '{key}'" in message
    assert text in message


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_unknown_model_is_rejected_without_methods(key):
    """A grid of teachers and plain students only: no method checks the pair, the models still are (a
    misspelt model passed check-config and snakemake -n, and no rule matched its output)."""
    config = set_in(demo(methods={}), f"pairs.0.{key}", "Resnet8")
    with pytest.raises(ConfigError, match=rf"config key 'pairs\[0\]\.{key}': unknown model 'Resnet8'"):
        resolve_grid(config)


def test_missing_pairs_and_empty_config():
    for config in ({}, {"seeds": [0]}):
        with pytest.raises(ConfigError, match=r"config key '\(top level\)': 'pairs' is a required property"):
            resolve_grid(config)


def test_every_problem_is_listed():
    config = set_in(set_in(demo(), "training.epochs", 0), "alphas", [2])
    with pytest.raises(ConfigError) as error:
        resolve_grid(config)
    assert "config key 'training.epochs'" in str(error.value) and "config key 'alphas[0]'" in str(error.value)


@pytest.mark.parametrize("dotted,value", [("seeds", [1.0]), ("training.epochs", 3.0), ("training.batch_size", 64.0)])
def test_integer_valued_floats_are_rejected(dotted, value):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{dotted}")):
        resolve_grid(set_in(demo(), dotted, value))


# --- kdlab check-config -------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_check_config_prints_the_job_counts(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # check-config loads the data: small archives in CIFAR's format
    for dataset in ("Cifar10", "Cifar100"):
        write_cifar(tmp_path / "data", dataset)
    assert kdlab_main(["check-config", str(REPO / "config" / name)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out
    for rule, n in expected_counts(load_grid(REPO / "config" / name)).items():
        assert f"{n} {rule}" in out


def test_check_config_rejects_unreadable_files(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("pairs: [teacher: {\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- pairs\n")
    for path, text in ((tmp_path / "missing.yaml", "cannot read the config"),
                       (broken, "cannot read the config"), (listed, "config key '(top level)'")):
        assert kdlab_main(["check-config", str(path)]) == 2
        assert text in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("seeds: [0]\nseeds: [1]\n", "key 'seeds' appears twice in one mapping"),
    ("training:\n  epochs: 3\n  epochs: 5\n", "key 'epochs' appears twice in one mapping"),
    ("experiments_dir: caf\xe9\n".encode("latin-1"), "it is not UTF-8 text (byte 0xe9 at position 20)"),
    ("seeds: " + "[" * 5000 + "\n", "nested too deeply"),
    ("seeds: &s [0, *s]\n", "it contains itself (a recursive YAML alias)"),
], ids=["duplicate key", "duplicate nested key", "latin-1", "deep nesting", "recursive alias"])
def test_check_config_refuses_what_yaml_would_take_or_choke_on(content, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert kdlab_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_keys_of_other_datasets_may_be_spelled_out_with_their_null_defaults():
    config = demo()
    config["data"] = {"dataset": "Cifar100", "npz_path": None, "num_classes": None}
    assert resolve_grid(config)["data"]["npz_path"] is None


def test_code_identity_ignores_hidden_files(tmp_path, monkeypatch):
    """An editor's lock file `.#train.py` is a dangling link inside the package."""
    import kdlab.runio
    package = tmp_path / "kdlab"
    package.mkdir()
    (package / "train.py").write_text("x = 1\n")
    (package / "runio.py").write_text("")
    monkeypatch.setattr(kdlab.runio, "__file__", str(package / "runio.py"))
    kdlab.runio.code_sha256.cache_clear()
    try:
        before = kdlab.runio.code_sha256()
        (package / ".#train.py").symlink_to("user@host.1:1")
        (package / ".ipynb_checkpoints").mkdir()
        (package / ".ipynb_checkpoints" / "train-checkpoint.py").write_text("x = 2\n")
        kdlab.runio.code_sha256.cache_clear()
        assert kdlab.runio.code_sha256() == before
        (package / "train.py").write_text("x = 3\n")
        kdlab.runio.code_sha256.cache_clear()
        assert kdlab.runio.code_sha256() != before
    finally:
        kdlab.runio.code_sha256.cache_clear()


def test_a_yaml_merge_key_may_be_overridden_without_counting_as_a_duplicate(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {epochs: 3, lr: 0.1}\ntraining: {<<: *b, epochs: 5}\n")
    assert read_yaml(path)["training"] == {"epochs": 5, "lr": 0.1}


def kdlab(*args):
    return subprocess.run([sys.executable, "-m", "kdlab.cli", *args], capture_output=True, text=True, timeout=120)


def test_check_config_cli(tmp_path):
    good = kdlab("check-config", str(REPO / "config" / "demo.yaml"))
    assert good.returncode == 0 and "valid" in good.stdout, good.stderr  # the counts: test_check_config_prints_...

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_config("zero epochs")))
    result = kdlab("check-config", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert re.search(r"kdlab check-config: error: .*\n\s*config key 'training.epochs'", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_says_when_a_download_is_pending(tmp_path, capsys):
    data_dir = tmp_path / "data"
    config = tmp_path / "cifar.yaml"
    config.write_text(yaml.safe_dump({**demo(), "data": {"dataset": "Cifar100", "data_dir": str(data_dir),
                                                         "download": True}}))
    assert kdlab_main(["check-config", str(config)]) == 0
    assert f"Cifar100 is not in {data_dir} yet: snakemake downloads it (data.download) before the first job" in \
        capsys.readouterr().out
    data_dir.mkdir()
    (data_dir / "cifar-100-python.tar.gz").write_bytes(b"half a download")  # there: read, and refused
    assert kdlab_main(["check-config", str(config)]) == 2
    assert "cifar-100-python.tar.gz is not a readable tar.gz archive" in capsys.readouterr().err


# --- through Snakemake ------------------------------------------------------------

def tree(root):
    """Every path under root with what would show a change to it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                path.read_bytes() if path.is_file() else None)
    return out


@pytest.fixture
def workflow_copy(tmp_path):
    """The workflow (Snakefile, rules, configs) in a scratch directory with an existing
    experiments directory holding a file, so no test touches the repository's runs."""
    root = tmp_path / "wf"
    root.mkdir()
    shutil.copy(REPO / "Snakefile", root)
    shutil.copytree(REPO / "workflow", root / "workflow")
    shutil.copytree(REPO / "config", root / "config")
    (root / "experiments" / "Synthetic").mkdir(parents=True)
    (root / "experiments" / "Synthetic" / "keep.txt").write_text("an earlier run\n")
    return root


SNAKEMAKE_BAD = ["unknown student", "experiments_dir with ;", "unknown method key", "experiments_dir leading dash",
                 "experiments_dir with braces", "training.lr nan"]


@pytest.mark.parametrize("name", SNAKEMAKE_BAD)
def test_snakemake_rejects_bad_config_before_touching_anything(name, workflow_copy, tmp_path):
    _, _, key, text = BAD[name]
    config = bad_config(name)
    if name == "experiments_dir with ;":
        config["experiments_dir"] = "experiments;touch PWNED"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    before = tree(tmp_path)
    returncode, output = snakemake_dry_run(workflow_copy, "--configfile", str(bad))
    assert returncode != 0, output
    assert f"config key '{key}'" in output and text in output, output
    assert "Traceback" not in output, output
    assert tree(tmp_path) == before, "snakemake -n with a bad config changed files"


def snakemake_dry_run(cwd, *args):
    """(exit status, stdout + stderr) of `snakemake -n` in `cwd`, with this venv's kdlab on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_snakemake_names_the_line_of_a_yaml_error_in_the_default_config(workflow_copy):
    """Snakemake's own message ("Config file is not valid JSON or YAML") names no line."""
    default = workflow_copy / "config" / "config.yaml"
    default.write_text(default.read_text() + "seeds: [0, 1\nalphas: [0.5]\n")
    lines = default.read_text().count("\n")
    returncode, output = snakemake_dry_run(workflow_copy)
    assert returncode != 0 and "Traceback" not in output, output
    assert "kdlab: cannot read the config config/config.yaml" in output, output
    assert f'in "config/config.yaml", line {lines}, column 7' in output, output
