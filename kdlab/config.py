"""Configuration: validation against workflow/schemas/config.schema.yaml, defaults, and
the expansion of an experiment grid into runs (paths and per-run configs).

Every error is a ConfigError whose message names the offending key.
"""

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

from .methods import METHODS, get_method
from .models import BLOCKS_PER_STAGE

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
# Keys that do not change what a run computes: a resumed run may change them.
RUNTIME_KEYS = {"data": {"data_dir", "download"},
                "training": {"num_workers", "device", "max_skipped_steps", "eval_batch_size",
                             "channels_last", "compile", "teacher_cache"}}


class ConfigError(ValueError):
    pass


# JSON Schema counts 3.0 as an integer; a seed 1.0 would make a run directory ".../1.0".
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool)))


def grid_schema():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    alphas = {k: v for k, v in schema["properties"]["alphas"].items() if k not in ("default", "description")}
    schema["properties"]["methods"].update(additionalProperties=False, properties={
        name: {"type": "object", "additionalProperties": False,
               "properties": {**m.SETTINGS, "alphas": {**alphas, "description": "overrides the global alphas"}}}
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
        },
    }


def key_name(path):
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate(instance, schema, prefix=""):
    validator = StrictValidator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            key = key_name([prefix] + list(e.absolute_path) if prefix else list(e.absolute_path))
            lines.append(f"config key '{key}': {e.message}")
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
    run = with_defaults(run, schema)
    if run["kind"] == "distill":
        if run["method"] == "none":
            raise ConfigError("config key 'method': a distilled student needs a distillation method, not 'none'")
        run["training"] = {**run["training"], "label_smoothing": 0.0}  # hard labels for every distilled student
    run["method_settings"] = method_settings(run["method"], run["method_settings"], "method_settings")
    check_models_and_methods(run["model"], run["teacher"], run["method"], run["method_settings"], "")
    if get_method(run["method"]).NEEDS_TEACHER and not (run["teacher"] and run["teacher_weights"]):
        raise ConfigError(f"config key 'teacher_weights': method {run['method']!r} needs a teacher and its weights")
    if run["paraphraser"] and run["method"] != "ft":
        raise ConfigError(f"config key 'paraphraser': only method 'ft' uses a paraphraser, not {run['method']!r}")
    return run


def check_models_and_methods(student, teacher, method, settings, where):
    for key, name in (("student", student), ("teacher", teacher)):
        if name is not None and name not in BLOCKS_PER_STAGE:
            raise ConfigError(f"config key '{where}{key}': unknown model {name!r}; "
                              f"known models: {', '.join(BLOCKS_PER_STAGE)}")
    try:
        get_method(method).check(settings, student, teacher)
    except ValueError as e:
        raise ConfigError(f"config key 'methods.{method}': {e}") from None


def resolve_grid(config):
    """Validate an experiment grid and fill in defaults; raises ConfigError naming the key."""
    schema = grid_schema()
    validate(config, schema)
    grid = with_defaults(config, schema)
    validate(grid["teacher_training"], {"$defs": schema["$defs"], **schema["$defs"]["training"]}, "teacher_training")
    if grid["teacher_seed"] not in grid["teacher_seeds"]:
        raise ConfigError(f"config key 'teacher_seed': {grid['teacher_seed']} is not one of "
                          f"teacher_seeds {grid['teacher_seeds']}")
    data = grid["data"]
    if data["dataset"] == "npz" and not data["npz_path"]:
        raise ConfigError("config key 'data.npz_path': dataset npz needs the path of its .npz file")
    if data["dataset"] == "npz" and not Path(data["npz_path"]).exists():
        raise ConfigError(f"config key 'data.npz_path': {data['npz_path']} does not exist")
    for where, alphas in [("alphas", grid["alphas"])] + [(f"methods.{m}.alphas", b["alphas"])
                                                          for m, b in grid["methods"].items() if "alphas" in b]:
        names = [format_alpha(a) for a in alphas]
        if any(float(n) != float(a) or "e" in n for n, a in zip(names, alphas)) or len(set(names)) < len(names):
            raise ConfigError(f"config key '{where}': {alphas} must be plain decimals (at most 6 significant "
                              f"digits, no exponent) that name distinct run directories alpha_<value>")
    for i, pair in enumerate(grid["pairs"]):
        for name, settings in grid["methods"].items():
            settings = {k: v for k, v in settings.items() if k != "alphas"}
            check_models_and_methods(pair["student"], pair["teacher"], name, settings, f"pairs[{i}].")
    return grid


def load_grid(path):
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the config {path}: {e}") from None
    return resolve_grid(config or {})


def format_alpha(alpha):
    return format(float(alpha), "g")


def split_runtime(run):
    """(what a run computes, how it runs): a run config without and with only RUNTIME_KEYS."""
    semantic, runtime = dict(run), {}
    for block, keys in RUNTIME_KEYS.items():
        semantic[block] = {k: v for k, v in run[block].items() if k not in keys}
        runtime[block] = {k: v for k, v in run[block].items() if k in keys}
    return semantic, runtime


def fingerprint(run, file_hashes):
    """What a run computes: a checkpoint resumes only under the same fingerprint."""
    semantic = {k: v for k, v in split_runtime(run)[0].items() if k not in ("teacher_weights", "paraphraser")}
    semantic["method_version"] = get_method(run["method"]).VERSION
    semantic["inputs"] = file_hashes
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]
