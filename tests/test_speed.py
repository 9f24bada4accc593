"""Speed levers that must not change results: channels_last, the teacher-output cache,
reading the step figures every N steps, torch.compile; and the classic benchmark, run tiny."""

import copy
import errno
import os
import shutil
import sys
import zipfile

import pytest
import torch
import yaml

from kdlab import teacher_cache
from kdlab.config import RUNTIME_KEYS, resolve_grid, resolve_run
from kdlab.data import ImageDataset, load_dataset
from kdlab.grid import expand_grid
from kdlab.methods import METHODS
from kdlab.models import build_model
from kdlab.runio import UnreadableFile, file_sha256, save_weights
from kdlab.teacher_cache import (NUM_VIEWS, TeacherCache, TeacherCacheError, build, cache_key, cache_path,
                                 why_not_cached)
from kdlab.guard import GuardError
from kdlab.train import Normalize, load_frozen_teacher, student_forward, train

from conftest import REPO, interrupt_after_checkpoints, read_json, teacher_with_cache, tiny_run, tiny_student

CHANCE = 100 / 5
CACHE_DATA = {"dataset": "Synthetic", "synthetic": {"num_classes": 5, "train_size": 64, "test_size": 100, "seed": 0}}


def test_channels_last_gives_the_nchw_results():
    torch.manual_seed(0)
    nchw = build_model("ResNet8", 10)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32)
    out_a, out_b = nchw(x), nhwc(x.contiguous(memory_format=torch.channels_last))
    assert out_b[0].is_contiguous(memory_format=torch.channels_last)  # it really ran in that layout
    for a, b in zip(out_a, out_b):  # the same sums in another order: float32 rounding apart
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    out_a[-1].pow(2).sum().backward()
    out_b[-1].pow(2).sum().backward()
    for (name, a), b in zip(nchw.named_parameters(), nhwc.parameters()):
        assert (b.grad - a.grad).norm() <= 1e-4 * a.grad.norm(), name  # norm-wise: sums that cancel stay fair


def test_a_channels_last_run_matches_an_nchw_run(tmp_path):
    runs = [train(tiny_run(training={"epochs": 2, "channels_last": layout}), tmp_path / str(layout))
            for layout in (False, True)]
    a, b = (r["history"] for r in runs)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    # 20 steps at a high learning rate amplify rounding differences; still the same run.
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=5e-2)
    assert b["test_acc"] == pytest.approx(a["test_acc"], abs=3)


def test_the_compiled_student_detaches_only_the_outputs_its_loss_does_not_read():
    torch.manual_seed(0)
    model = build_model("ResNet8", 5)
    assert student_forward(model, METHODS["fitnets"]) is model  # reads the stage features
    x = torch.randn(8, 3, 32, 32)
    compiled = torch.compile(student_forward(model, METHODS["kd"]))(x)
    assert [o.requires_grad for o in compiled] == [False, False, False, True, True]
    compiled_grads = torch.autograd.grad(compiled[-1].pow(2).sum() + compiled[-2].sum(), list(model.parameters()))
    eager = model(x)
    eager_grads = torch.autograd.grad(eager[-1].pow(2).sum() + eager[-2].sum(), list(model.parameters()))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    for (name, _), a, b in zip(model.named_parameters(), eager_grads, compiled_grads):
        assert (b - a).norm() <= 1e-4 * a.norm(), name


@pytest.fixture(scope="module")
def cached_teacher(trained_teacher, tmp_path_factory):
    """A copy of the trained teacher's weights with its cache for CACHE_DATA beside it."""
    return teacher_with_cache(trained_teacher, tmp_path_factory.mktemp("cached_teacher"), tiny_run(data=CACHE_DATA))


def test_cached_teacher_outputs_equal_live_ones_for_random_views(cached_teacher):
    arrays = load_dataset(resolve_run(tiny_run(data=CACHE_DATA))["data"])
    key = cache_key("ResNet8", file_sha256(cached_teacher), arrays)
    cache = TeacherCache(cache_path(cached_teacher), key, torch.device("cpu"))
    assert cache.outputs.dtype == torch.float16 and cache.outputs.shape == (64, NUM_VIEWS, 5 + 64)
    g = torch.Generator().manual_seed(0)
    keys = [(0, 0, 0, 0), (1, 8, 8, 1), (2, 4, 4, 0), (3, 0, 8, 1)] + list(zip(
        torch.randint(0, 64, (60,), generator=g).tolist(), torch.randint(0, 9, (60,), generator=g).tolist(),
        torch.randint(0, 9, (60,), generator=g).tolist(), torch.randint(0, 2, (60,), generator=g).tolist()))
    images, _, views = (torch.stack(x) if isinstance(x[0], torch.Tensor) else x
                        for x in zip(*(ImageDataset(arrays.train_x, arrays.train_y)[k] for k in keys)))
    teacher = load_frozen_teacher({"teacher": "ResNet8", "teacher_weights": cached_teacher}, 5, torch.device("cpu"))
    with torch.no_grad():
        *_, embedding, logits = teacher(Normalize(arrays.mean, arrays.std, "cpu")(images))
    cached_embedding, cached_logits = cache(views)
    for live, cached in ((logits, cached_logits), (embedding, cached_embedding)):
        error = (cached - live).abs()
        assert (error <= 1e-3 * live.abs() + 1e-6).all(), (error / live.abs()).max()  # fp16: 2^-11 relative
    assert (cached_logits - logits).abs().max() > 0  # float16 storage, so not bit-equal: the test can fail

    with pytest.raises(TeacherCacheError, match="another teacher_sha256"):
        TeacherCache(cache_path(cached_teacher), {**key, "teacher_sha256": "0" * 64}, "cpu")
    other_data = load_dataset(resolve_run(tiny_run(data={"synthetic": {**CACHE_DATA["synthetic"], "seed": 1}}))["data"])
    with pytest.raises(TeacherCacheError, match="another data_sha256"):
        TeacherCache(cache_path(cached_teacher), cache_key("ResNet8", key["teacher_sha256"], other_data), "cpu")


def outputs_offset(path):
    """Where the outputs' bytes start in a cache file (torch stores them uncompressed in its zip)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def test_a_damaged_cache_is_refused_naming_the_file_and_an_old_one_read_with_a_warning(cached_teacher, tmp_path,
                                                                                       monkeypatch, capsys):
    arrays = load_dataset(resolve_run(tiny_run(data=CACHE_DATA))["data"])
    key = cache_key("ResNet8", file_sha256(cached_teacher), arrays)
    damaged = tmp_path / "teacher_cache.pth"
    shutil.copy(cache_path(cached_teacher), damaged)
    flip_a_bit(damaged)
    saved = torch.load(damaged, weights_only=True)  # torch itself reads it without complaint
    original = torch.load(cache_path(cached_teacher), weights_only=True)
    assert torch.isfinite(saved["outputs"]).all() and (saved["outputs"] != original["outputs"]).sum() == 1
    for device in ("cpu", "meta"):  # meta: the path of a GPU, where the checksum's pass also copies
        with pytest.raises(TeacherCacheError, match=rf"cache {damaged} is damaged.*kdlab cache-teacher.*snakemake"):
            TeacherCache(damaged, key, device)
    assert TeacherCache(cache_path(cached_teacher), key, "meta").outputs.device.type == "meta"

    whole = teacher_cache.outputs_sha256(original["outputs"])
    monkeypatch.setattr(teacher_cache, "CHUNK_BYTES", 1000)  # many chunks, the last one short
    copy = torch.empty_like(original["outputs"])
    assert teacher_cache.outputs_sha256(original["outputs"], copy) == whole and torch.equal(copy, original["outputs"])

    old = {"key": key, "outputs": original["outputs"]}  # as kdlab wrote it before the checksum
    torch.save(old, damaged)
    assert torch.equal(TeacherCache(damaged, key, "cpu").outputs, original["outputs"])
    assert f"teacher cache {damaged} was built before kdlab checksummed it; it cannot be verified" in \
        capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\x00" * 5000, "is not a file written by kdlab cache-teacher"),
    ("half", "is truncated or corrupt"),
    ({"weights": torch.zeros(3)}, "is not a file written by kdlab cache-teacher"),
], ids=["empty", "garbage", "truncated", "another_file"])
def test_an_unreadable_cache_says_how_to_rebuild_it(cached_teacher, tmp_path, content, message):
    path = tmp_path / "teacher_cache.pth"
    if content == "half":
        whole = cache_path(cached_teacher).read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif isinstance(content, dict):
        torch.save(content, path)
    else:
        path.write_bytes(content)
    with pytest.raises(TeacherCacheError, match=rf"teacher cache {path} {message}.*rebuild it with `kdlab "
                                                rf"cache-teacher`, or delete it and run snakemake"):
        TeacherCache(path, {"num_classes": 5}, "cpu")


def flip_a_bit(path, at=1000):
    """One bit of one output, as a failing disk or copy would change it."""
    with open(path, "r+b") as f:
        f.seek(outputs_offset(path) + at)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))


class FullDisk:
    """A file whose writes fail with EFBIG (what `ulimit -f` or a full quota gives) beyond `limit` bytes."""

    def __init__(self, f, limit):
        self.f, self.limit = f, limit

    def write(self, data):
        if self.f.tell() + len(data) > self.limit:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def counting(monkeypatch, fail_on_call=None):
    """Count compute_outputs calls (one per part); interrupt the build on call `fail_on_call`."""
    calls, real = [], teacher_cache.compute_outputs

    def compute_outputs(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt  # as a kill would stop it
        return real(*args, **kwargs)
    monkeypatch.setattr(teacher_cache, "compute_outputs", compute_outputs)
    return calls


def copy_teacher(trained_teacher, directory):
    directory.mkdir(exist_ok=True)
    for name in ("model.pth", "model.pth.sha256"):
        shutil.copy(trained_teacher[0] / name, directory / name)
    return directory / "model.pth"


def build_tiny(weights, images, log=lambda message: None):
    build(tiny_run(data={"synthetic": {**CACHE_DATA["synthetic"], "train_size": images}}), weights,
          cache_path(weights), log=log)


def test_a_build_removes_stale_temporary_files_and_a_full_disk_leaves_none(trained_teacher, tmp_path, monkeypatch):
    weights, copied = copy_teacher(trained_teacher, tmp_path), ["model.pth", "model.pth.sha256"]
    stale, unrelated = tmp_path / ".teacher_cache.pth.k3x9q2ab.tmp", tmp_path / ".metrics.json.abcd1234.tmp"
    stale.write_bytes(b"\x00" * 1000)  # what a build killed during its final write leaves
    unrelated.write_bytes(b"{}")
    part_bytes = 2 * NUM_VIEWS * (5 + 64) * 2
    monkeypatch.setattr(teacher_cache, "PART_BYTES", part_bytes)  # 2 images a part
    messages = []
    with monkeypatch.context() as disk:  # the disk fills during the final write (4 images), not the parts' (2)
        real_fdopen = os.fdopen
        disk.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), 1.5 * part_bytes))
        with pytest.raises(OSError, match=rf"^\[Errno 27\] File too large: '{tmp_path}/teacher_cache.pth'$"):
            build_tiny(weights, 4, messages.append)
    assert any(str(stale) in m and "interrupted build" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".teacher_cache.pth.parts", unrelated.name, *copied])
    assert sorted(p.name for p in (tmp_path / ".teacher_cache.pth.parts").iterdir()) == [
        "0000000-0000002.pth", "0000002-0000004.pth"]  # no temporary file anywhere

    calls, messages = counting(monkeypatch), []
    build_tiny(weights, 4, messages.append)  # once there is room: from the parts, computing nothing
    assert not calls and sum("read from" in m for m in messages) == 2, messages
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([unrelated.name, *copied, "teacher_cache.pth",
                                                                 ".teacher_cache.pth.kept"])
    data = {"synthetic": {**CACHE_DATA["synthetic"], "train_size": 4}}
    arrays = load_dataset(resolve_run(tiny_run(data=data))["data"])
    TeacherCache(cache_path(weights), cache_key("ResNet8", file_sha256(weights), arrays), "cpu")


def test_a_killed_build_resumes_at_its_first_missing_or_damaged_part(trained_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "PART_BYTES", 3 * NUM_VIEWS * (5 + 64) * 2)  # 3 images a part: 3 parts
    weights = {name: copy_teacher(trained_teacher, tmp_path / name) for name in ("killed", "whole")}
    build_tiny(weights["whole"], 8)

    calls = counting(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(weights["killed"], 8)
    parts = tmp_path / "killed" / ".teacher_cache.pth.parts"
    assert len(calls) == 3 and sorted(p.name for p in parts.iterdir()) == ["0000000-0000003.pth", "0000003-0000006.pth"]
    flip_a_bit(parts / "0000003-0000006.pth")

    calls, messages = counting(monkeypatch), []
    build_tiny(weights["killed"], 8, messages.append)
    assert len(calls) == 2  # the damaged part and the missing one
    assert any("computing it again" in m and "0000003-0000006.pth is damaged" in m for m in messages), messages
    assert not parts.exists()
    resumed, whole = (torch.load(cache_path(w), weights_only=True) for w in weights.values())
    assert torch.equal(resumed["outputs"], whole["outputs"]) and resumed["key"] == whole["key"]


def test_a_rerun_build_links_back_the_kept_file_of_the_same_teacher_and_data(trained_teacher, tmp_path,
                                                                              monkeypatch):
    """Snakemake reruns cache_teacher whenever the teacher's job reran (identical weights
    rewritten from its finished checkpoint), deleting the cache first: the build links the
    kept file back, computing nothing; a damaged kept file or other weights compute again."""
    weights, kept = copy_teacher(trained_teacher, tmp_path), tmp_path / ".teacher_cache.pth.kept"
    build_tiny(weights, 4)
    first = torch.load(cache_path(weights), weights_only=True)["outputs"]
    assert os.path.samefile(kept, cache_path(weights))  # a hard link: no space of its own

    calls, messages = counting(monkeypatch), []
    cache_path(weights).unlink()  # as Snakemake does before it reruns the job
    build_tiny(weights, 4, messages.append)
    assert not calls and any(f"kept as {kept} and checked" in m for m in messages), messages
    assert torch.equal(torch.load(cache_path(weights), weights_only=True)["outputs"], first)
    assert os.path.samefile(kept, cache_path(weights))
    build_tiny(weights, 4)  # by hand, over the intact cache: nothing computed, nothing left behind
    assert not calls and sorted(p.name for p in tmp_path.iterdir()) == [
        ".teacher_cache.pth.kept", "model.pth", "model.pth.sha256", "teacher_cache.pth"]

    with monkeypatch.context() as no_links:  # e.g. protected_hardlinks and another user's file
        no_links.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
        cache_path(weights).unlink()
        build_tiny(weights, 4, messages.append)
    assert len(calls) == 1 and any("could not link" in m and "computing the cache again" in m for m in messages)
    assert torch.equal(torch.load(cache_path(weights), weights_only=True)["outputs"], first)
    calls.clear()

    cache_path(weights).unlink()
    flip_a_bit(kept)
    build_tiny(weights, 4, messages.append)
    assert len(calls) == 1 and any("not reusing" in m and "do not match their checksum" in m for m in messages)
    assert torch.equal(torch.load(cache_path(weights), weights_only=True)["outputs"], first)
    assert os.path.samefile(kept, cache_path(weights))

    state = torch.load(weights, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1.0  # other teacher weights: other logits
    save_weights(weights, state)
    build_tiny(weights, 4, messages.append)
    assert len(calls) == 2 and any("not reusing" in m and "another teacher_sha256" in m for m in messages)
    assert not torch.equal(torch.load(cache_path(weights), weights_only=True)["outputs"], first)
    assert os.path.samefile(kept, cache_path(weights))


def test_damaged_teacher_weights_stop_a_rerun_build_before_it_removes_the_kept_file(trained_teacher, tmp_path,
                                                                                     monkeypatch):
    """Snakemake reruns cache_teacher when the teacher's model.pth changed, also when it changed by damage: the
    build stops naming the weights, and the kept file of the intact ones stays, so that once the weights are
    rebuilt (the same bytes, from the teacher's finished checkpoint) it is linked back instead of computed again
    (hours on a CPU for CIFAR-100). It was removed as "computed from another teacher_sha256"."""
    weights, kept = copy_teacher(trained_teacher, tmp_path), tmp_path / ".teacher_cache.pth.kept"
    build_tiny(weights, 4)
    intact = weights.read_bytes()
    cache_path(weights).unlink()  # as Snakemake does before it reruns the job
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x10
    weights.write_bytes(bytes(damaged))
    calls, messages = counting(monkeypatch), []
    with pytest.raises(UnreadableFile, match=f"teacher weights {weights}: .*delete {weights} and run snakemake"):
        build_tiny(weights, 4, messages.append)
    assert kept.exists() and not calls and not any("not reusing" in m for m in messages), messages
    weights.write_bytes(intact)
    build_tiny(weights, 4, messages.append)
    assert not calls and any(f"kept as {kept} and checked" in m for m in messages), messages


def test_which_runs_read_the_cache():
    def run(method, **training):
        return {"kind": "distill", "method": method, "data": {"dataset": "Synthetic"}, "training": training}
    assert why_not_cached(run("kd")) is None and why_not_cached(run("rkd", teacher_cache=True)) is None
    assert "intermediate features" in why_not_cached(run("fitnets"))
    assert "intermediate features" in why_not_cached(run("ft"))
    assert "teacher_cache is false" in why_not_cached(run("kd", teacher_cache=False))
    changed = {**run("kd"), "data": {"dataset": "Synthetic", "augmentation": {"crop_padding": 2}}}
    assert "augmentation" in why_not_cached(changed)
    default = {**run("kd"), "data": {"augmentation": {"crop_padding": 4, "horizontal_flip": True}}}
    assert why_not_cached(default) is None

    # The workflow: one cache job per teacher, an input of exactly the runs of methods that
    # read only logits and embedding (the demo itself builds no cache: too few epochs).
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["training"]["teacher_cache"] = True
    jobs = expand_grid(resolve_grid(demo))
    caches = [j for j in jobs if j.rule == "cache_teacher"]
    assert [j.outputs for j in caches] == [["experiments/Synthetic/teachers/ResNet14/0/teacher_cache.pth"]]
    assert caches[0].inputs == ["experiments/Synthetic/teachers/ResNet14/0/model.pth"]
    assert set(caches[0].run["training"]) <= RUNTIME_KEYS["training"]
    for job in (j for j in jobs if j.rule == "distill"):
        reads_cache = getattr(METHODS[job.run["method"]], "TEACHER_OUTPUTS", None) == "logits+embedding"
        assert (caches[0].outputs[0] in job.inputs) == reads_cache, job.outputs
    demo["training"]["teacher_cache"] = False
    assert not [j for j in expand_grid(resolve_grid(demo)) if j.rule == "cache_teacher"]


def test_a_kd_run_from_the_cache_ends_as_one_with_the_live_teacher(cached_teacher, tmp_path, capsys):
    def kd(seed, cache):
        run = tiny_run(kind="distill", method="kd", alpha=0.9, teacher="ResNet8", teacher_weights=str(cached_teacher),
                       seed=seed, data=CACHE_DATA, training={"epochs": 3, "batch_size": 16, "teacher_cache": cache})
        return train(run, tmp_path / f"{seed}{cache}")
    cached, live, other_seed = kd(0, True), kd(0, False), kd(1, False)
    out = capsys.readouterr().out
    assert "from the cache" in out and "teacher runs live: training.teacher_cache is false" in out
    # What the run did, not only its setting: a by-hand run without the cache file says "live" too.
    assert (cached["provenance"]["teacher_outputs"], live["provenance"]["teacher_outputs"]) == ("cache", "live")
    seed_noise = max(abs(other_seed["last_acc"] - live["last_acc"]), 3.0)
    assert abs(cached["last_acc"] - live["last_acc"]) <= seed_noise
    assert cached["history"]["train_loss"] == pytest.approx(live["history"]["train_loss"], rel=1e-2)
    assert cached["history"]["terms"]["kd"] == pytest.approx(live["history"]["terms"]["kd"], rel=1e-2)


def test_a_bf16_run_on_the_cpu_learns_as_a_float32_one(trained_teacher, tmp_path):
    """bf16 autocast on the CPU is the benchmark's fastest CPU setting where the CPU has bf16 instructions
    (AVX512-BF16, AMX): it must train the student as float32 does, within seed noise."""
    def kd(seed, amp):
        run = tiny_student("kd", trained_teacher[0], alpha=0.5, training={"amp": amp, "epochs": 3, "milestones": [2]})
        return train({**run, "seed": seed}, tmp_path / f"{seed}{amp}")
    bf16, fp32, other_seed = kd(1, "bf16"), kd(1, "off"), kd(2, "off")
    assert bf16["config"]["training"]["amp"] == "bf16" and not any(bf16["history"]["skipped_steps"])
    assert bf16["best_acc"] >= CHANCE + 40, bf16["history"]["test_acc"]
    seed_noise = max(abs(other_seed["last_acc"] - fp32["last_acc"]), 3.0)
    assert abs(bf16["last_acc"] - fp32["last_acc"]) <= seed_noise, (bf16["last_acc"], fp32["last_acc"], seed_noise)


def test_a_finished_run_rewrites_its_outputs_without_reading_the_cache(cached_teacher, tmp_path, monkeypatch):
    run = tiny_run(kind="distill", method="kd", alpha=0.9, teacher="ResNet8", teacher_weights=str(cached_teacher),
                   data=CACHE_DATA, training={"epochs": 1, "batch_size": 16})
    first = train(run, tmp_path)
    assert first["provenance"]["teacher_outputs"] == "cache"
    (tmp_path / "metrics.json").unlink()  # Snakemake reruns the job: its outputs are rewritten, not trained
    monkeypatch.setattr(sys.modules["kdlab.train"], "TeacherCache", None)  # any use of the cache fails
    again = train(run, tmp_path)
    assert "outputs_rewritten" in again["provenance"] and again["history"] == first["history"]


@pytest.mark.parametrize("amp,images,poisoned,message", [
    # 10 steps per epoch: call 13 is epoch 2, step 3
    ("off", 320, {13}, r"epoch 2, step 3: loss term 'poison' went non-finite; amp is 'off'"),
    # 6 steps per epoch (fp16 is slow on a CPU): calls 7.. are epoch 2, steps 1..
    ("fp16", 48, set(range(7, 100)), r"epoch 2, step 2: 2 consecutive optimizer steps skipped by the fp16 GradScaler"),
])
def test_the_guard_is_as_strong_when_figures_are_read_every_n_steps(monkeypatch, poison_method, tmp_path, amp, images,
                                                                     poisoned, message):
    # As on CUDA: the figures of 4 steps are read at once; the guard still names the step
    # and stops before any checkpoint holds a step it should have refused.
    monkeypatch.setitem(sys.modules["kdlab.train"].SYNC_EVERY, "cpu", 4)
    poison_method(poisoned.__contains__)
    run = tiny_run(kind="distill", method="poison", alpha=0.5,
                   data={"synthetic": {"num_classes": 5, "train_size": images, "test_size": 8, "seed": 0}},
                   training={"amp": amp, "max_skipped_steps": 2, "batch_size": 32 if amp == "off" else 8})
    with pytest.raises(GuardError, match=message):
        train(run, tmp_path)
    progress = read_json(tmp_path / "progress.json")
    assert progress["status"] == "failed" and progress["epochs_done"] == 1
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(w).all() for w in checkpoint["model"].values())


def test_a_compiled_run_learns_and_resumes(trained_teacher, tmp_path):
    """KD with the student and the live teacher compiled (each epoch's first step, where the
    gradient share takes a second backward, runs the eager model)."""
    import kdlab.train
    run = tiny_run(kind="distill", method="kd", alpha=0.5, teacher="ResNet8", seed=1,
                   teacher_weights=str(trained_teacher[0] / "model.pth"),
                   training={"compile": True, "epochs": 3, "milestones": [2]})
    interrupt_after_checkpoints(kdlab.train, 1, train, run, tmp_path)
    metrics = train(run, tmp_path)
    assert metrics["resumed_at_epochs"] == [1] and metrics["status"] == "complete"
    assert metrics["best_acc"] > CHANCE + 40, metrics["history"]["test_acc"]
    assert all(0 < share < 1 for share in metrics["history"]["grad_share"])
    assert not any(k.startswith("_orig_mod") for k in torch.load(tmp_path / "model.pth", weights_only=True))


def test_the_classic_benchmark_runs_in_its_reduced_mode(capsys):
    sys.path.insert(0, str(REPO / "bench"))
    from bench_classic import main
    results = main(["--teacher", "ResNet8", "--student", "ResNet8", "--classes", "5", "--train-size", "32",
                    "--test-size", "16", "--batch-size", "16", "--epochs", "2", "--workers", "0",
                    "--levers", "layout,cache", "--cache-images", "4"])
    out = capsys.readouterr().out
    names = ["classic", "kdlab, no levers", "kdlab + layout alone", "kdlab + cache alone",
             "kdlab, fastest (layout + cache)"]
    assert all(results[name] > 0 for name in names + ["bare"]) and results["cache_rate"] > 0
    assert "bound: the student's own work (layout;" in out
    assert all(name in out for name in names[1:])
    assert "CIFAR-100 (50000 images, 100 classes): 2.66 GB" in out
    fastest = min(names[1:], key=results.get)  # not necessarily all levers together
    assert f"speed-up, kdlab fastest over classic: {results['classic'] / results[fastest]:.2f}x ({fastest})" in out


def test_the_other_benchmarks_run_in_their_reduced_modes(capsys):
    """bench_train.py (kdlab's loop against a bare one) and bench_results.py (the results tool
    against a naive script, which also checks that both tables agree) cannot rot unseen."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_results
    import bench_train
    best = bench_train.main(["--model", "ResNet8", "--epochs", "2", "--train-size", "64", "--batch-size", "32",
                             "--workers", "0"])
    assert best["bare"] > 0 and best["kdlab"] > 0 and "kdlab / bare time ratio" in capsys.readouterr().out
    assert bench_results.main(["--runs", "41", "--epochs", "3", "--curve-runs", "1", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "re-run, 1 run changed (2 redrawn)" in out and "curves, sample of 1 runs" in out
