"""Published teachers: RepDistiller's checkpoint layout converted, imported as a teacher run."""

import copy
import hashlib
import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdlab.cli import main as kdlab_main
from kdlab.config import ConfigError, check_data_files, load_grid
from kdlab.data import load_dataset
from kdlab.grid import expand_grid
from kdlab.models import build_model
from kdlab.teachers import ConversionError, convert, state_dict_of

from conftest import REPO, TINY_DATA
from test_workflow import ENV


# ------------------------------------------------- RepDistiller's CIFAR ResNet, as published
# (models/resnet.py of github.com/HobbitLong/RepDistiller, written out again here: the
# reference the conversion is checked against; names and structure are theirs.)

class RefBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + residual)


class RefResNet(nn.Module):
    def __init__(self, depth, num_classes, num_filters=(16, 16, 32, 64)):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [RefBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RefBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


def trained_looking(model, seed=0):
    """Random weights and BatchNorm statistics far from their init, so a swapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model.eval()


def repdistiller_checkpoint(path, depth, num_classes, prefix=""):
    """A file laid out as RepDistiller's train_teacher.py saves it."""
    ref = trained_looking(RefResNet(depth, num_classes))
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(72.34),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005}]}}, path)
    return ref


@pytest.mark.parametrize("depth,name,prefix", [(14, "ResNet14", ""), (8, "ResNet8", "module.")])
def test_converted_repdistiller_weights_give_the_same_logits(tmp_path, depth, name, prefix):
    ref = repdistiller_checkpoint(tmp_path / "ckpt.pth", depth, 7, prefix)
    checkpoint = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    model, layout = convert(state_dict_of(checkpoint, "ckpt"), name, 7, "ckpt")
    assert layout == "repdistiller"
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want, got = ref(x), model.eval()(x)[-1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.1  # logits that vary, so a wrong mapping could not pass
    # Our own layout goes through unchanged.
    again, layout = convert(model.state_dict(), name, 7, "ours")
    assert layout == "kdlab"
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[-1], got)


def test_what_does_not_map_is_an_error_naming_the_key(tmp_path):
    state = trained_looking(RefResNet(14, 5)).state_dict()
    with pytest.raises(ConversionError, match=r"key 'layer1\.1\.conv1\.weight'.*ResNet8"):
        convert(state, "ResNet8", 5, "ckpt")                        # deeper than the teacher
    with pytest.raises(ConversionError, match=r"'fc\.weight' has shape \(5, 64\).*\(10, 64\)"):
        convert(state, "ResNet14", 10, "ckpt")                      # other number of classes
    with pytest.raises(ConversionError, match=r"first 'stages\.0\.1\.conv1\.weight'"):
        convert(trained_looking(RefResNet(8, 5)).state_dict(), "ResNet14", 5, "ckpt")  # shallower
    with pytest.raises(ConversionError, match=r"key 'layer1\.0\.se\.weight'"):
        convert({**state, "layer1.0.se.weight": torch.zeros(1)}, "ResNet14", 5, "ckpt")
    with pytest.raises(ConversionError, match="neither a state dict"):
        state_dict_of({"epoch": 3}, "ckpt")


def grid_config(tmp_path, checkpoint):
    return {"data": copy.deepcopy(TINY_DATA), "pairs": [{"teacher": "ResNet14", "student": "ResNet8"}],
            "seeds": [0], "teacher_seeds": [0, 1], "alphas": [0.5], "methods": {"kd": {}},
            "experiments_dir": str(tmp_path / "experiments"), "results_dir": str(tmp_path / "results"),
            "teacher_checkpoints": {"ResNet14": str(checkpoint)},
            "training": {"epochs": 1, "num_workers": 0, "device": "cpu"}}


def test_import_teacher_job_writes_a_complete_teacher_run(tmp_path):
    ckpt = tmp_path / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    ckpt.parent.mkdir()
    ref = repdistiller_checkpoint(ckpt, 14, TINY_DATA["synthetic"]["num_classes"])
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid_config(tmp_path, ckpt)))
    grid = load_grid(tmp_path / "grid.yaml")
    jobs = expand_grid(grid)
    rules = [j.rule for j in jobs]
    assert rules.count("import_teacher") == 1 and "train_teacher" not in rules  # no training
    (imp,) = [j for j in jobs if j.rule == "import_teacher"]
    assert imp.inputs == [str(ckpt)] and imp.outputs[0].endswith("/teachers/ResNet14/0/metrics.json")
    distill = next(j for j in jobs if j.rule == "distill")
    assert distill.run["teacher_weights"] == imp.outputs[1]      # distillation is unchanged

    run_dir = tmp_path / "experiments/Synthetic/teachers/ResNet14/0"
    run_dir.mkdir(parents=True)
    (run_dir / ".model.pth.k1ll3d.tmp").write_bytes(b"\0" * 100)  # an earlier import killed while writing
    assert kdlab_main(["import-teacher", "--config", json.dumps(imp.run), "--run-dir", str(run_dir)]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "model.pth", "model.pth.sha256"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["status"], metrics["run"]["kind"], metrics["run"]["student"]) == \
        ("complete", "teacher", "ResNet14")
    assert metrics["source"]["path"] == str(ckpt) and metrics["source"]["layout"] == "repdistiller"
    assert metrics["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert metrics["source"]["epoch"] == 240
    assert metrics["source"]["recorded_accuracy"] == pytest.approx(72.34)
    # The test accuracy, measured independently with the reference network.
    arrays = load_dataset(grid["data"])
    mean = torch.tensor(arrays.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(arrays.std).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(arrays.test_x).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        want = 100.0 * int((ref(x).argmax(1) == torch.from_numpy(arrays.test_y)).sum()) / len(x)
    assert metrics["best_acc"] == metrics["last_acc"] == pytest.approx(want, abs=1e-9)
    weights = torch.load(run_dir / "model.pth", weights_only=True)
    model = build_model("ResNet14", arrays.num_classes)
    model.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x[:8])[-1], ref(x[:8]), rtol=1e-5, atol=1e-5)


def test_teacher_checkpoints_are_validated(tmp_path):
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"")
    cfg = grid_config(tmp_path, ckpt)
    for checkpoints, message in (({"ResNet20": str(ckpt)}, "'teacher_checkpoints.ResNet20': ResNet20 is not the "
                                                           "teacher of any pair"),
                                 ({"ResNet14": str(tmp_path / "no.pth")}, "'teacher_checkpoints.ResNet14': .* "
                                                                         "does not exist"),
                                 ({"ResNet14": str(tmp_path)}, "'teacher_checkpoints.ResNet14': .* is not a file"),
                                 ({"Res/Net": str(ckpt)}, "'teacher_checkpoints'")):
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**cfg, "teacher_checkpoints": checkpoints}))
        with pytest.raises(ConfigError, match=message):  # a missing file: when the first job is due
            check_data_files(load_grid(tmp_path / "grid.yaml"))


def test_workflow_imports_instead_of_training(tmp_path):
    """A dry run: the two teacher rules do not compete for the teacher's outputs."""
    ckpt = tmp_path / "t.pth"
    repdistiller_checkpoint(ckpt, 14, 5)
    cfg = grid_config(tmp_path, ckpt)
    cfg["pairs"].append({"teacher": "ResNet8", "student": "ResNet8"})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(["snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "-n", "--cores", "1", "--configfile", str(tmp_path / "grid.yaml")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from test_workflow import planned
    assert planned(proc.stdout) == {"import_teacher": 1, "train_teacher": 2, "train_student": 1, "distill": 2,
                                    "cache_teacher": 2, "aggregate": 1}  # kd reads the teachers' output caches
