"""Configuration: validation against workflow/schemas/config.schema.yaml, defaults, and
the expansion of an experiment grid into runs (paths and per-run configs).

Every error is a ConfigError whose message names the offending key.
"""

import copy
import hashlib
import json
import math
from pathlib import Path

import jsonschema
import yaml

from .data import DEFAULT_AUGMENTATION
from .layout import format_alpha, recipe_name
from .methods import METHODS, get_method
from .models import BLOCKS_PER_STAGE

# workflow/schemas/config.schema.yaml, through a link in the package: a wheel (`pip install .`) holds
# the file itself, and kdlab installed so validates as in the checkout.
SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"
# Keys that do not change what a run computes: a resumed run may change them.
RUNTIME_KEYS = {"data": {"data_dir", "download"},
                "training": {"num_workers", "device", "max_skipped_steps", "eval_batch_size",
                             "channels_last", "compile", "teacher_cache", "checkpoint_minutes"}}


# data keys that only some datasets read: given with another, they would be silently ignored.
DATASET_KEYS = {"npz_path": ("npz",), "num_classes": ("npz",), "synthetic": ("Synthetic",)}


class ConfigError(ValueError):
    pass


# JSON Schema counts 3.0 as an integer; a seed 1.0 would make a run directory ".../1.0".
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool)))


def additive_schema(defs, method):
    """One additive recipe of `method`: kd's own loss is its KD term, so it takes no kd_temperature."""
    recipe = copy.deepcopy(defs["additive"])
    if method == "kd":
        del recipe["properties"]["kd_temperature"]
    return recipe


def grid_schema():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    alphas = {k: v for k, v in schema["properties"]["alphas"].items() if k not in ("default", "description")}
    schema["properties"]["methods"].update(additionalProperties=False, properties={
        name: {"type": "object", "additionalProperties": False,
               "properties": {**m.SETTINGS, "alphas": {**alphas, "description": "overrides the global alphas"},
                              "additive": {"type": "array", "minItems": 1,
                                           "items": additive_schema(schema["$defs"], name),
                                           "description": "additive recipes; without the method's own "
                                                          "alphas, the global alphas do not apply"}}}
        for name, m in METHODS.items() if m.NEEDS_TEACHER})
    return schema


def run_schema():
    grid = grid_schema()
    return {
        "$defs": grid["$defs"], "type": "object", "additionalProperties": False,
        "required": ["kind", "model", "seed", "method"],
        "properties": {
            "kind": {"enum": ["teacher", "student", "distill", "paraphraser"]},
            "model": {"$ref": "#/$defs/safe_name"},
            "teacher": {"anyOf": [{"$ref": "#/$defs/safe_name"}, {"type": "null"}], "default": None},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2147483647},
            "method": {"enum": list(METHODS)},
            "alpha": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0},
            "method_settings": {"type": "object", "default": {}},
            "data": {"$ref": "#/$defs/data"},
            "training": {"$ref": "#/$defs/training"},
            "teacher_weights": {"anyOf": [{"$ref": "#/$defs/path"}, {"type": "null"}], "default": None},
            "paraphraser": {"anyOf": [{"$ref": "#/$defs/path"}, {"type": "null"}], "default": None},
            "additive": {"type": "object"},  # absent: the convex form with alpha; checked per method below
        },
    }


def key_name(path):
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def unsafe_values(instance, path=()):
    """(path, message) for every NaN or infinity (NaN compares false against every schema bound)
    and every string with a control character (a schema pattern's $ also matches before a
    final newline)."""
    if isinstance(instance, float) and not math.isfinite(instance):
        return [(list(path), "must be a finite number, not NaN or infinity")]
    if isinstance(instance, str) and any(ord(c) < 32 or ord(c) == 127 for c in instance):
        return [(list(path), f"{instance!r} must not contain control characters (newlines, tabs)")]
    if isinstance(instance, dict):
        return [e for k, v in instance.items() for e in unsafe_values(v, path + (k,))]
    if isinstance(instance, list):
        return [e for i, v in enumerate(instance) for e in unsafe_values(v, path + (i,))]
    return []


def schema_message(error):
    if error.validator == "pattern" and "description" in error.schema:
        return f"{error.instance!r} is not allowed here: it must be {error.schema['description']}"
    if error.validator == "additionalProperties" and error.schema.get("properties"):  # a typo: say what is known
        return f"{error.message}; known keys: {', '.join(error.schema['properties'])}"
    return error.message + yaml_hint(error)


def yaml_hint(error):
    """Why a value has the wrong type, where YAML or Snakemake's --config is the likely cause."""
    if error.validator != "type":
        return ""
    value, wanted = error.instance, error.validator_value
    wanted = set(wanted) if isinstance(wanted, list) else {wanted}
    if isinstance(value, bool) and "string" in wanted:
        return " (YAML reads off/on/yes/no unquoted as booleans: quote the word, e.g. \"off\")"
    if isinstance(value, str) and "boolean" in wanted and value.lower() in ("true", "false"):
        return f" (snakemake --config reads only True and False as booleans: write {value.capitalize()})"
    if not (isinstance(value, str) and wanted & {"number", "integer", "array", "object"}):
        return ""
    if value and value[0] in "[{":
        return (" (snakemake --config passes lists and mappings as strings: set them in a YAML file given with a "
                "second --configfile)")
    try:
        float(value)
    except ValueError:
        return ""
    if value.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return ""
    if "e" in value.lower():
        return " (YAML 1.1 reads an exponent as a number only with a dot and a sign: write 1.0e-3 or 0.001)"
    # Snakemake's --config reads every value inside a mapping (training={"epochs": 2}) as a string.
    return (" (a number in quotes is a string: remove the quotes; snakemake --config passes the values inside a "
            "list or a mapping as strings: set them in a YAML file given with a second --configfile)")


def validate(instance, schema, prefix=""):
    validator = StrictValidator(schema)
    try:
        errors = [(list(e.absolute_path), schema_message(e)) for e in validator.iter_errors(instance)]
        errors += unsafe_values(instance)
    except RecursionError:
        raise ConfigError(f"invalid configuration{f' under {prefix!r}' if prefix else ''}: it contains itself "
                          f"(a recursive YAML alias) or is nested too deeply") from None
    if errors:
        lines = []
        for path, message in sorted(errors, key=lambda e: [str(p) for p in e[0]]):
            key = key_name([prefix] + path if prefix else path)
            lines.append(f"config key '{key}': {message}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))


def resolve_ref(schema, root):
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def with_defaults(instance, schema, root=None):
    """A copy of instance with every missing key that has a schema default filled in."""
    root = root or schema
    schema = resolve_ref(schema, root)
    if not isinstance(instance, dict) or "properties" not in schema:
        return instance
    out = dict(instance)
    for key, sub in schema["properties"].items():
        # A default next to a $ref (experiments_dir) wins over the referenced block's (data, training).
        default = sub if "default" in sub else resolve_ref(sub, root)
        if key not in out and "default" in default:
            out[key] = copy.deepcopy(default["default"])
        if key in out:
            out[key] = with_defaults(out[key], sub, root)
    return out


def method_settings(method, given, where):
    m = get_method(method)
    schema = {"type": "object", "additionalProperties": False, "properties": m.SETTINGS}
    validate(given, schema, where)
    return with_defaults(given, schema)


def resolve_run(run):
    """Validate a single run's config (what `kdlab train` receives) and fill in defaults."""
    schema = run_schema()
    validate(run, schema)
    if "additive" in run:
        if run["kind"] != "distill" or "alpha" in run:
            raise ConfigError("config key 'additive': only a distilled student takes an additive recipe, "
                              "and then without 'alpha'")
        recipe = additive_schema(schema["$defs"], run["method"])
        validate(run["additive"], recipe, "additive")
        run = {**run, "additive": with_defaults(run["additive"], recipe)}
    run = with_defaults(run, schema)
    if run["kind"] == "distill":
        if run["method"] == "none":
            raise ConfigError("config key 'method': a distilled student needs a distillation method, not 'none'")
        run["training"] = {**run["training"], "label_smoothing": 0.0}  # hard labels for every distilled student
    run["method_settings"] = method_settings(run["method"], run["method_settings"], "method_settings")
    check_models(run["model"], run["teacher"], "")
    check_method(run["method"], run["method_settings"], "method_settings")
    if get_method(run["method"]).NEEDS_TEACHER and not (run["teacher"] and run["teacher_weights"]):
        raise ConfigError(f"config key 'teacher_weights': method {run['method']!r} needs a teacher and its weights")
    if run["paraphraser"] and run["method"] != "ft":
        raise ConfigError(f"config key 'paraphraser': only method 'ft' uses a paraphraser, not {run['method']!r}")
    return run


def check_models(student, teacher, where):
    for key, name in (("student", student), ("teacher", teacher)):
        if name is not None and name not in BLOCKS_PER_STAGE:
            raise ConfigError(f"config key '{where}{key}': unknown model {name!r}; "
                              f"known models: {', '.join(BLOCKS_PER_STAGE)}")


def check_method(method, settings, key):
    check = getattr(get_method(method), "check", None)
    try:
        if check:
            check(settings)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def resolve_grid(config):
    """Validate an experiment grid and fill in defaults; raises ConfigError naming the key."""
    schema = grid_schema()
    validate(config, schema)
    grid = with_defaults(config, schema)
    validate(grid["teacher_training"], {"$defs": schema["$defs"], **schema["$defs"]["training"]}, "teacher_training")
    if grid["teacher_seed"] not in grid["teacher_seeds"]:
        raise ConfigError(f"config key 'teacher_seed': {grid['teacher_seed']} is not one of "
                          f"teacher_seeds {grid['teacher_seeds']}")
    teachers = {pair["teacher"] for pair in grid["pairs"]}
    for name, path in grid["teacher_checkpoints"].items():
        if name not in teachers:
            raise ConfigError(f"config key 'teacher_checkpoints.{name}': {name} is not the teacher of any pair")
    for key in ("experiments_dir", "results_dir"):
        check_directory(grid[key], key)
    data = grid["data"]
    if data["dataset"] == "npz" and not data["npz_path"]:
        raise ConfigError("config key 'data.npz_path': dataset npz needs the path of its .npz file")
    for key, value in (config.get("data") or {}).items():
        if key in DATASET_KEYS and value not in (None, {}) and data["dataset"] not in DATASET_KEYS[key]:
            raise ConfigError(f"config key 'data.{key}': only dataset {' or '.join(DATASET_KEYS[key])} reads it, "
                              f"and data.dataset is {data['dataset']}: remove it")
    for where, alphas in [("alphas", grid["alphas"])] + [(f"methods.{m}.alphas", b["alphas"])
                                                          for m, b in grid["methods"].items() if "alphas" in b]:
        names = [format_alpha(a) for a in alphas]
        if not all(map(plain_decimal, alphas)) or len(set(names)) < len(names):
            raise ConfigError(f"config key '{where}': {alphas} must be plain decimals (at most 6 significant "
                              f"digits, no exponent) that name distinct run directories alpha_<value>")
    for method, block in grid["methods"].items():
        if "additive" not in block:
            continue
        recipe = additive_schema(schema["$defs"], method)
        block["additive"] = [with_defaults(r, recipe) for r in block["additive"]]
        weights = [r[k] for r in block["additive"] for k in ("ce_weight", "kd_weight")]
        names = [recipe_name(additive=r) for r in block["additive"]]
        if not all(map(plain_decimal, weights)) or len(set(names)) < len(names):
            raise ConfigError(f"config key 'methods.{method}.additive': the weights must be plain decimals (at "
                              f"most 6 significant digits, no exponent) that name distinct run directories "
                              f"additive_ce<ce_weight>_kd<kd_weight> (kd_temperature is not part of the name: "
                              f"two recipes may not differ in it alone)")
        if method == "kd" and any(r["ce_weight"] + r["kd_weight"] == 0 for r in block["additive"]):
            raise ConfigError("config key 'methods.kd.additive': a recipe with ce_weight and kd_weight both 0 "
                              "trains on a loss of exactly 0")
    first_seen = {}
    for i, pair in enumerate(grid["pairs"]):
        key = (pair["teacher"], pair["student"])
        if key in first_seen:
            raise ConfigError(f"config key 'pairs[{i}]': {pair['teacher']} -> {pair['student']} repeats "
                              f"pairs[{first_seen[key]}]; every pair must be listed once")
        first_seen[key] = i
        check_models(pair["student"], pair["teacher"], f"pairs[{i}].")
    for name, block in grid["methods"].items():
        check_method(name, settings_of(block), f"methods.{name}")
    return grid


def check_directory(path, key):
    """`path` is a directory or can be made one: no part of it is an existing file."""
    for part in (Path(path), *Path(path).parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"config key '{key}': {part} is a file, not a directory")
            return


def grid_warnings(grid):
    """Settings that are legal but probably not meant: printed, never fatal."""
    pairs = grid["pairs"]
    warnings = [f"config key 'pairs[{i}]': teacher {p['teacher']} is not larger than its student {p['student']}"
                for i, p in enumerate(pairs)
                if BLOCKS_PER_STAGE.get(p["teacher"], 0) <= BLOCKS_PER_STAGE.get(p["student"], 0)]
    # ResNet112 (the FT code's name) and ResNet110 are one network here: a pair listed under
    # both names trains the same runs twice.
    same = {(p["teacher"], p["student"]): i for i, p in enumerate(pairs)}
    for i, p in enumerate(pairs):
        alias = tuple("ResNet110" if m == "ResNet112" else m for m in (p["teacher"], p["student"]))
        if alias != (p["teacher"], p["student"]) and alias in same:
            warnings.append(f"config key 'pairs[{i}]': {p['teacher']} -> {p['student']} is the same network pair "
                            f"as pairs[{same[alias]}] (ResNet112 is ResNet110 under the FT code's name); its runs "
                            f"are trained twice")
    # teacher_training holds only overrides: the teachers' device is training's unless it says otherwise.
    cpu = [key for key, block in (("training", grid["training"]), ("teacher_training", grid["teacher_training"]))
           if block.get("device") == "cpu"]
    if grid["resources"]["gpu"] > 0 and cpu:
        warnings.append(f"config key '{cpu[0]}.device': 'cpu', while resources.gpu asks "
                        f"{grid['resources']['gpu']} GPU(s) for every job: on a cluster they stay idle")
    runtime = grid["resources"]["runtime"]
    for key, minutes, rules in (
            ("training", grid["training"]["checkpoint_minutes"], ("train_student", "distill")),
            ("teacher_training", {**grid["training"], **grid["teacher_training"]}["checkpoint_minutes"],
             ("train_teacher",))):
        walltime = min(runtime[r] for r in rules)
        if minutes >= walltime:
            warnings.append(f"config key '{key}.checkpoint_minutes': {minutes:g} is not under the first attempt's "
                            f"walltime ({walltime} min, resources.runtime): a walltime kill would keep no checkpoint, "
                            f"and every retry would start over")
    return warnings


def check_data_files(grid, download=False):
    """Read the grid's data files (exist, readable, keys, shapes, labels) and check that its
    published teacher checkpoints exist, before the first job (not when planning: a dry run
    plans without them). `download`: fetch a CIFAR set configured with data.download now."""
    from .data import DataError, check_data
    for name, path in grid["teacher_checkpoints"].items():
        if not Path(path).is_file():
            raise ConfigError(f"config key 'teacher_checkpoints.{name}': {path} "
                              f"{'is not a file' if Path(path).exists() else 'does not exist'}")
    try:
        check_data(grid["data"], download)
    except DataError as e:
        key = "data.npz_path" if grid["data"]["dataset"] == "npz" else "data.data_dir"
        raise ConfigError(f"config key '{key}': {e}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys after it may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key is None or isinstance(key, (str, int, float, bool)):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path, what="the config"):
    """A YAML/JSON file's content; every way it can be unreadable is a ConfigError naming the file."""
    try:
        loader = UniqueKeyLoader(Path(path).read_bytes().decode("utf-8"))
        loader.name = str(path)  # for the error marks: 'in "<path>", line 3, column 1'
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read {what} {path}: it is not UTF-8 text (byte {e.object[e.start]:#x} at "
                          f"position {e.start})") from None
    except RecursionError:
        raise ConfigError(f"cannot read {what} {path}: it is nested too deeply") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None


def load_grid(path):
    return resolve_grid(read_yaml(path) or {})


def plain_decimal(x):
    """Whether x prints as itself in a run directory's name (alpha_0.5, additive_ce1_kd0.9)."""
    name = format_alpha(x)
    return float(name) == float(x) and "e" not in name


def settings_of(method_block):
    """A method's own settings: its grid block without the keys that choose its recipes."""
    return {k: v for k, v in method_block.items() if k not in ("alphas", "additive")}


def split_runtime(run):
    """(what a run computes, how it runs): a run config without and with only RUNTIME_KEYS."""
    semantic, runtime = dict(run), {}
    for block, keys in RUNTIME_KEYS.items():
        semantic[block] = {k: v for k, v in run[block].items() if k not in keys}
        runtime[block] = {k: v for k, v in run[block].items() if k in keys}
    # Today's augmentation, the default, is left out of a run's identity (its Snakemake param and
    # fingerprint) so that runs made before data.augmentation existed stay complete and resumable.
    if semantic["data"].get("augmentation") == DEFAULT_AUGMENTATION:
        del semantic["data"]["augmentation"]
    return semantic, runtime


def fingerprint(run, file_hashes):
    """What a run computes: a checkpoint resumes only under the same fingerprint."""
    semantic = {k: v for k, v in split_runtime(run)[0].items() if k not in ("teacher_weights", "paraphraser")}
    semantic["method_version"] = get_method(run["method"]).VERSION
    semantic["inputs"] = file_hashes
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]
