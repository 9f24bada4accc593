"""Published teachers: a checkpoint trained elsewhere, converted into a teacher run.

Most papers distil from the teachers RepDistiller released (resnet56 72.34%,
resnet110 74.31% on CIFAR-100). `kdlab import-teacher` (the workflow's
`import_teacher` job, for every teacher named in the config's `teacher_checkpoints`)
reads such a checkpoint, converts its keys into this package's layout, measures its
test accuracy as a trained teacher's run does, and writes the teacher's run directory
(model.pth, then metrics.json), so the distillation jobs use it unchanged.

RepDistiller's CIFAR ResNet (models/resnet.py) is ours with other names: conv1/bn1
stem, layer1..3 of BasicBlocks (conv1, bn1, conv2, bn2, and where the stride or width
changes a downsample of a 1x1 conv + BN, i.e. projection shortcuts like ours), an
AvgPool2d(8) over the 8x8 map (= our global average) and fc. Its checkpoints are dicts
with the state dict under 'model'. A checkpoint in our own layout (a plain state dict,
or a dict with it under 'model') is taken as it is. Anything that does not map (an
unknown key, a missing one, a shape that differs) is an error naming the key.
"""

import re
from pathlib import Path

import torch

from .config import ConfigError, grid_schema, validate, with_defaults
from .data import load_dataset, make_loaders
from .methods import get_method
from .models import build_model
from .runio import (UnreadableFile, atomic_write_json, file_sha256, now, provenance, remove_completion_marks,
                    remove_temporaries, save_weights, torch_load)
from .teacher_cache import FILE_NAME as TEACHER_CACHE
from .train import Normalize, evaluate, log, pick_device

# layerN.i.<part>.<param> -> stages.(N-1).i.<our part>.<param>
BLOCK_KEY = re.compile(r"^layer([1-3])\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)$")
BLOCK_PART = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
              "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
STEM_PART = {"conv1": "stem.0", "bn1": "stem.1", "fc": "fc"}


class ConversionError(ValueError):
    """A checkpoint that does not map onto the teacher's architecture; names the key."""


def repdistiller_key(key):
    """Our name for a key of RepDistiller's CIFAR ResNet, or None if it has none."""
    m = BLOCK_KEY.match(key)
    if m:
        stage, block, part, param = m.groups()
        return f"stages.{int(stage) - 1}.{block}.{BLOCK_PART[part]}.{param}"
    head, _, param = key.partition(".")
    if head in STEM_PART and param and "." not in param:
        return f"{STEM_PART[head]}.{param}"
    return None


def state_dict_of(checkpoint, source):
    """The state dict inside a checkpoint: under 'model' (RepDistiller) or the whole file."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConversionError(f"{source}: neither a state dict nor a dict holding one under 'model'")
    # nn.DataParallel saves every key with a 'module.' prefix.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def convert(state, model_name, num_classes, source):
    """A `model_name` built for `num_classes` with the weights of `state` (either layout).

    Returns (model, layout name). Every key of `state` must map onto a parameter or buffer
    of the same shape, and every one of ours must be given (BatchNorm's
    num_batches_tracked excepted: older checkpoints lack it and evaluation ignores it).
    """
    model = build_model(model_name, num_classes)
    ours = model.state_dict()
    layout = "kdlab" if any(k.startswith(("stem.", "stages.")) for k in state) else "repdistiller"
    converted = {}
    for key, value in state.items():
        name = key if layout == "kdlab" else repdistiller_key(key)
        if name is None or name not in ours:
            raise ConversionError(f"{source}: key {key!r} ({layout} layout) has no counterpart in {model_name}"
                                  + (f" (it would be {name!r})" if name else ""))
        if value.shape != ours[name].shape:
            raise ConversionError(f"{source}: key {key!r} has shape {tuple(value.shape)}, {model_name}'s "
                                  f"{name!r} has {tuple(ours[name].shape)} (architecture or number of classes)")
        converted[name] = value
    missing = [k for k in ours if k not in converted and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConversionError(f"{source}: {len(missing)} of {model_name}'s weights are not in the checkpoint, "
                              f"first {missing[0]!r} (a shallower network?)")
    for k in ours:
        converted.setdefault(k, ours[k])
    model.load_state_dict(converted)
    return model, layout


def import_schema():
    schema = grid_schema()
    return {"$defs": schema["$defs"], "type": "object", "additionalProperties": False,
            "required": ["kind", "model", "seed", "checkpoint"],
            "properties": {"kind": {"const": "import_teacher"}, "model": {"$ref": "#/$defs/safe_name"},
                           "seed": {"type": "integer", "minimum": 0}, "checkpoint": {"$ref": "#/$defs/path"},
                           "data": {"$ref": "#/$defs/data"}, "training": {"$ref": "#/$defs/training"}}}


def import_teacher(run, run_dir):
    """Convert run['checkpoint'] into the teacher run directory `run_dir`; return its record."""
    schema = import_schema()
    validate(run, schema)
    run = with_defaults(run, schema)
    tr, run_dir, path = run["training"], Path(run_dir), Path(run["checkpoint"])
    if not path.is_file():
        raise ConfigError(f"config key 'teacher_checkpoints.{run['model']}': {path} "
                          f"{'is not a file' if path.exists() else 'does not exist'}")
    remove_completion_marks(run_dir)
    remove_temporaries(run_dir, others=(TEACHER_CACHE,))  # from writes that a kill interrupted, not the cache build's
    started = now()
    arrays = load_dataset(run["data"])
    try:  # weights_only refuses arbitrary pickles; a damaged file fails here too
        checkpoint = torch_load(path)
    except UnreadableFile as e:
        raise ConversionError(f"{e}; it must be a checkpoint of tensors") from None
    model, layout = convert(state_dict_of(checkpoint, path), run["model"], arrays.num_classes, path)
    device = pick_device(tr["device"])
    _, test_loader = make_loaders(arrays, tr["batch_size"], tr["num_workers"], run["seed"],
                                  device.type == "cuda", tr["eval_batch_size"])
    test_loss, test_acc = evaluate(model.to(device), test_loader, Normalize(arrays.mean, arrays.std, device),
                                   device, lambda: torch.autocast(device.type, enabled=False))
    log(f"imported teacher {run['model']} from {path} ({layout} layout): test accuracy {test_acc:.2f}%")
    meta = checkpoint if isinstance(checkpoint, dict) else {}
    recorded, epoch = meta.get("accuracy"), meta.get("epoch")
    try:  # RepDistiller stores its own test accuracy (a tensor) and epoch: kept for reference
        recorded = round(float(recorded), 4) if recorded is not None else None
        epoch = int(epoch) if epoch is not None else None
    except (TypeError, ValueError, RuntimeError):
        recorded = epoch = None
    prov = provenance(device, started, arrays.sha256())
    prov["finished"] = now()
    record = {
        "status": "complete", "error": None,
        "run": {"kind": "teacher", "dataset": run["data"]["dataset"], "method": "none", "alpha": None,
                "teacher": None, "student": run["model"], "seed": run["seed"], "num_classes": arrays.num_classes},
        "method_version": get_method("none").VERSION, "epochs_planned": 0, "epochs_done": 0,
        "history": {"test_loss": [test_loss], "test_acc": [test_acc]},
        "best_acc": test_acc, "best_epoch": None, "last_acc": test_acc, "teacher_acc": None,
        "resumed_at_epochs": [],
        "source": {"path": str(path), "sha256": file_sha256(path), "layout": layout,
                   "epoch": epoch, "recorded_accuracy": recorded},
        # Only the training keys an import uses: it trains nothing.
        "config": {**run, "training": {k: tr[k] for k in ("eval_batch_size", "num_workers", "device")}},
        "provenance": prov,
    }
    save_weights(run_dir / "model.pth", model.state_dict())
    atomic_write_json(run_dir / "metrics.json", record)
    return record
