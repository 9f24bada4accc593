import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.data import (CIFAR_ARCHIVES, CIFAR_FILES, PAD, AugmentingSampler, DataError, ImageDataset, check_data,
                        load_cifar_pickles, load_npz, make_loaders, make_synthetic)
from kdlab.train import Normalize


def write_cifar(root, name, n_train=6, n_test=4, seed=0):
    """Small archives in CIFAR's own python-pickle format: rows of 3072 bytes, CHW order."""
    rng = np.random.default_rng(seed)
    folder, files, label_key, classes = {
        "Cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10),
        "Cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[name]
    (root / folder).mkdir(parents=True)
    written = {}
    for file in files:
        n = n_test if "test" in file else n_train
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        with open(root / folder / file, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": b"x"}, f)
        written[file] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["Cifar10", "Cifar100"])
def test_reads_cifar_archives(tmp_path, name):
    written = write_cifar(tmp_path, name)
    arrays = load_cifar_pickles(name, tmp_path)
    train_files = [f for f in written if "test" not in f]
    assert arrays.train_x.shape == (6 * len(train_files), 32, 32, 3)
    assert arrays.num_classes == (10 if name == "Cifar10" else 100)
    data, labels = written[train_files[0]]
    # Row layout is R plane, G plane, B plane: pixel (y, x) channel c sits at c*1024 + y*32 + x.
    assert arrays.train_x[0, 5, 7, 2] == data[0, 2 * 1024 + 5 * 32 + 7]
    assert arrays.train_y[: len(labels)].tolist() == labels
    test_data, test_labels = written["test_batch" if name == "Cifar10" else "test"]
    assert np.array_equal(arrays.test_x, test_data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert arrays.test_y.tolist() == test_labels


def test_missing_cifar_says_where_to_put_which_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar_pickles("Cifar100", tmp_path)
    message = str(e.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message
    assert "cifar-100-python.tar.gz" in message and "download" in message


def test_a_failed_download_names_the_setting_and_what_to_do(tmp_path, monkeypatch):
    import urllib.error
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError, match=r"Cifar100: data.download is true, but downloading https://\S+"
                                        r"cifar-100-python.tar.gz into .* failed \(URLError: .*Name or service not "
                                        r"known.*\). Download it where there is a network"):
        load_cifar_pickles("Cifar100", tmp_path, download=True)


def test_corrupt_and_misshapen_cifar_files_are_named(tmp_path):
    write_cifar(tmp_path, "Cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"cifar-100-python/test is not a readable CIFAR archive"):
        load_cifar_pickles("Cifar100", tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"cifar-100-python/test holds data of shape \(2, 100\)"):
        load_cifar_pickles("Cifar100", tmp_path)


def test_a_cifar_file_that_is_not_the_published_one_is_warned_about(tmp_path, capsys, monkeypatch):
    import hashlib
    import kdlab.data
    write_cifar(tmp_path, "Cifar100")
    load_cifar_pickles("Cifar100", tmp_path)  # the test's own small files: loaded, with a warning each
    out = capsys.readouterr().out
    for file in ("train", "test"):
        assert f"WARNING: {tmp_path / 'cifar-100-python' / file} is not the published Cifar100 file" in out
    published = {f"cifar-100-python/{f}": hashlib.md5((tmp_path / "cifar-100-python" / f).read_bytes()).hexdigest()
                 for f in ("train", "test")}
    monkeypatch.setattr(kdlab.data, "CIFAR_MD5", published)  # as if they were the published files
    load_cifar_pickles("Cifar100", tmp_path)
    assert "WARNING" not in capsys.readouterr().out


def test_npz_dataset_and_its_errors(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, train_x=x, train_y=np.array([0, 1, 2, 1]), test_x=x[:2], test_y=np.array([2, 0]))
    arrays = load_npz(path)
    assert arrays.num_classes == 3 and arrays.train_y.tolist() == [0, 1, 2, 1]
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        load_npz(path, num_classes=2)
    np.savez(path, train_x=x[:, :16], train_y=np.zeros(4, int), test_x=x, test_y=np.zeros(4, int))
    with pytest.raises(DataError, match=r"mine.npz: train images must be uint8 of shape \(N, 32, 32, 3\)"):
        load_npz(path)
    np.savez(path, train_x=x, train_y=np.zeros(4, int))
    with pytest.raises(DataError, match=r"mine.npz lacks array\(s\) test_x or x_test, test_y or y_test; "
                                         r"it holds train_x, train_y"):
        load_npz(path)
    np.savez(path, train_x=x, train_y=np.zeros(4, int), test_x=x[:0], test_y=np.zeros(0, int))
    with pytest.raises(DataError, match=r"mine.npz: the test split holds no images"):
        load_npz(path)
    with pytest.raises(DataError, match=r"nothere.npz is missing"):
        load_npz(tmp_path / "nothere.npz")


def test_npz_labels_beyond_the_class_bound_and_a_constant_channel(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, train_x=x, train_y=np.array([0, 1, 2, 10 ** 9]), test_x=x[:2], test_y=np.array([2, 0]))
    with pytest.raises(DataError, match=r"mine.npz: labels go up to 1000000000; they must be 0..K-1 with K from 2"):
        load_npz(path)
    np.savez(path, train_x=x, train_y=np.zeros(4, int), test_x=x[:2], test_y=np.zeros(2, int))
    with pytest.raises(DataError, match=r"mine.npz: labels go up to 0; they must be 0..K-1 with K from 2"):
        load_npz(path)
    x[..., 1:] = 0  # grayscale stored in red only
    np.savez(path, train_x=x, train_y=np.array([0, 1, 2, 1]), test_x=x[:2], test_y=np.array([2, 0]))
    arrays = load_npz(path)
    assert arrays.std[1:] == [1.0, 1.0] and arrays.std[0] == pytest.approx(x[..., 0].std() / 255)
    normalized = Normalize(arrays.mean, arrays.std, "cpu")(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert torch.isfinite(normalized).all() and (normalized[:, 1:] == 0).all()


def test_synthetic_contrast_and_noise_make_the_task_harder():
    def spread(arrays):
        """(distance between class means, pixel spread within a class), of the label-0/1 classes."""
        x, y = arrays.train_x.reshape(len(arrays.train_x), -1).astype(float), arrays.train_y
        m0, m1 = x[y == 0].mean(0), x[y == 1].mean(0)
        return np.sqrt(((m0 - m1) ** 2).mean()), (x[y == 0] - m0).std()

    default = make_synthetic(3, 300, 10, seed=0)
    assert np.array_equal(default.train_x, make_synthetic(3, 300, 10, seed=0, noise=40.0, contrast=1.0).train_x)
    (apart, noise), (apart_hard, noise_hard) = spread(default), spread(make_synthetic(3, 300, 10, 0, 60.0, 0.2))
    assert apart_hard < 0.3 * apart and noise_hard > 1.3 * noise


def test_synthetic_is_reproducible_and_label_dependent():
    a, b = make_synthetic(4, 50, 20, seed=3), make_synthetic(4, 50, 20, seed=3)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.train_x, make_synthetic(4, 50, 20, seed=4).train_x)
    # Learnable: images of one class are much closer to their class mean than to the others'.
    x = a.train_x.reshape(50, -1).astype(float)
    means = np.stack([x[a.train_y == c].mean(0) for c in range(4)])
    nearest = ((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == a.train_y).mean() > 0.9


def test_data_sha256_is_of_the_arrays_bytes_in_order():
    """The digest that checkpoints and teacher caches store: a change to how it is computed
    would make every existing run start fresh ("trained on other data")."""
    import hashlib
    a = make_synthetic(4, 50, 20, seed=3)
    digest = lambda *arrays: hashlib.sha256(b"".join(x.tobytes() for x in arrays)).hexdigest()  # noqa: E731
    assert a.sha256() == digest(a.train_x, a.train_y, a.test_x, a.test_y)
    assert a.sha256(("train",)) == digest(a.train_x, a.train_y)
    before, train_before = a.sha256(), a.sha256(("train",))
    a.test_y[0] = (a.test_y[0] + 1) % 4  # one test label: the whole digest changes, the training split's not
    assert a.sha256() != before and a.sha256(("train",)) == train_before


def test_crop_and_flip_follow_the_padding_definition():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    dataset = ImageDataset(images, np.zeros(1, int))
    padded = np.pad(images[0], ((4, 4), (4, 4), (0, 0)))
    for dy in range(9):
        for dx in range(9):
            for flip in (0, 1):
                expected = padded[dy:dy + 32, dx:dx + 32]
                if flip:
                    expected = expected[:, ::-1]
                got, _, view = dataset[(0, dy, dx, flip)]
                assert np.array_equal(got.numpy().transpose(1, 2, 0), expected)
                assert view.tolist() == [0, dy, dx, flip]
    assert np.array_equal(dataset[0][0].numpy().transpose(1, 2, 0), images[0])  # test time: unchanged
    assert dataset[0][2].tolist() == [0, PAD, PAD, 0]


def test_epoch_randomness_depends_only_on_seed_and_epoch():
    sampler = AugmentingSampler(100, seed=1)
    first = list(sampler)
    assert list(sampler) == first
    sampler.epoch = 1
    assert list(sampler) != first
    assert sorted(i for i, *_ in first) == list(range(100))


def test_loaders_give_the_same_batches_with_and_without_workers():
    arrays = make_synthetic(3, 40, 10, seed=0)
    batches = {}
    for workers in (0, 2):
        train, test = make_loaders(arrays, batch_size=16, num_workers=workers, seed=5, pin_memory=False)
        assert train.persistent_workers == (workers > 0) and test.persistent_workers == (workers > 0)
        out = []
        for epoch in (0, 1):
            train.sampler.epoch = epoch
            out += [torch.cat([x.flatten(), y, v.flatten()]) for x, y, v in train]
        batches[workers] = torch.cat(out)
    assert torch.equal(batches[0], batches[2])


def test_npz_with_keras_key_names(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    path = tmp_path / "keras.npz"
    np.savez(path, x_train=x, y_train=np.array([0, 1, 2, 1]), x_test=x[:2], y_test=np.array([2, 0]))
    arrays = load_npz(path)
    assert arrays.num_classes == 3 and len(arrays.test_x) == 2
    np.savez(path, images=x, labels=np.zeros(4, int))
    with pytest.raises(DataError, match=r"it holds images, labels, and must hold train_x or x_train"):
        load_npz(path)


def test_check_data_reads_every_file_before_any_job(tmp_path):
    npz = tmp_path / "d.npz"
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(npz, train_x=x, train_y=np.array([0, 1, 5, 1]), test_x=x, test_y=np.zeros(4, int))
    cfg = {"dataset": "npz", "npz_path": str(npz), "num_classes": 3}
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\), found 0..5"):
        check_data(cfg)
    check_data({**cfg, "num_classes": None})
    npz.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable .npz"):
        check_data(cfg)
    cifar = {"dataset": "Cifar100", "data_dir": str(tmp_path), "download": False}
    with pytest.raises(DataError, match=r"cifar-100-python/train is missing"):
        check_data(cifar)
    check_data({**cifar, "download": True})  # the first job downloads it
    write_cifar(tmp_path, "Cifar100")
    check_data(cifar)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"")
    with pytest.raises(DataError, match=r"cifar-100-python/test is empty"):
        check_data(cifar)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:  # the right keys, the wrong shape
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]}, f)
    with pytest.raises(DataError, match=r"cifar-100-python/test holds data of shape \(3, 100\)"):
        check_data(cifar)
    check_data({"dataset": "Synthetic"})


@pytest.mark.parametrize("padding,flip", [(0, False), (2, True), (4, False)])
def test_augmentation_is_configurable(padding, flip):
    arrays = make_synthetic(3, 64, 8, seed=0)
    train, test = make_loaders(arrays, batch_size=64, num_workers=0, seed=1, pin_memory=False,
                               augmentation={"crop_padding": padding, "horizontal_flip": flip})
    images, _, views = next(iter(train))
    _, dy, dx, flips = views.T
    assert dy.min() >= 0 and dy.max() <= 2 * padding and dx.max() <= 2 * padding
    assert (flips.sum() > 0) == flip and (dy.max() > 0) == (padding > 0)
    if padding == 0 and not flip:  # no augmentation at all: the plain images
        assert torch.equal(images, torch.from_numpy(arrays.train_x[views[:, 0].numpy()]).permute(0, 3, 1, 2))
    dataset = train.dataset
    padded = np.pad(arrays.train_x[0], ((padding, padding), (padding, padding), (0, 0)))
    got = dataset[(0, padding + 1 if padding else 0, 0, 1)][0].numpy().transpose(1, 2, 0)
    assert np.array_equal(got, padded[(padding + 1 if padding else 0):][:32, :32][:, ::-1])
    test_images, _, test_views = next(iter(test))  # test items: the plain image, whatever the padding
    assert torch.equal(test_images, torch.from_numpy(arrays.test_x).permute(0, 3, 1, 2))
    assert test_views[0].tolist() == [0, padding, padding, 0]
    assert make_loaders(arrays, 8, 0, 1, False)[0].sampler.padding == PAD  # default: today's augmentation


def py2_pickle(batch):
    """`batch` (str keys; a uint8 2-D array, int lists, str) pickled as Python 2's cPickle wrote
    the published CIFAR files: protocol 2, py2 str opcodes, the array through
    numpy.core.multiarray._reconstruct with its bytes as a py2 str."""
    import struct

    def string(s):
        s = s.encode("latin1") if isinstance(s, str) else s
        return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<i", len(s)) + s

    def value(v):
        if isinstance(v, str):
            return string(v)
        if isinstance(v, list):
            return b"](" + b"".join(b"J" + struct.pack("<i", x) if isinstance(x, int) else string(x) for x in v) + b"e"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string("b") + b"\x87R"
                + b"(K\x01" + b"".join(b"J" + struct.pack("<i", d) for d in v.shape) + b"\x86"
                + b"cnumpy\ndtype\n" + string("u1") + b"K\x00K\x01\x87R(K\x03" + string("|")
                + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(v.tobytes()) + b"tb")
    return b"\x80\x02}(" + b"".join(string(k) + value(v) for k, v in batch.items()) + b"u."


def write_published_cifar(data_dir, name, n_train=5, n_test=3, seed=0, extracted=True, archive=True):
    """Small CIFAR files as published: py2 pickles, in the folder and/or the .tar.gz that holds it."""
    import io
    import tarfile
    rng = np.random.default_rng(seed)
    folder, files, label_key, classes = {
        "Cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 10),
        "Cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", 100),
    }[name]
    blobs, written = {}, {}
    for file in files:
        n = n_test if "test" in file else n_train
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        batch = {"batch_label": f"{file} batch", label_key: labels, "data": data,
                 "filenames": [f"img{i}.png" for i in range(n)]}
        if name == "Cifar100":
            batch["coarse_labels"] = [label // 5 for label in labels]
        blobs[file], written[file] = py2_pickle(batch), (data, labels)
    blobs["meta" if name == "Cifar100" else "batches.meta"] = py2_pickle({"label_names": ["a", "b"]})
    data_dir.mkdir(parents=True, exist_ok=True)
    if extracted:
        (data_dir / folder).mkdir()
        for file, blob in blobs.items():
            (data_dir / folder / file).write_bytes(blob)
    if archive:
        with tarfile.open(data_dir / CIFAR_ARCHIVES[name], "w:gz") as tar:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            for file, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{file}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return written


@pytest.mark.parametrize("name", ["Cifar10", "Cifar100"])
def test_published_cifar_loads_from_the_archive_the_folder_or_both(tmp_path, name, capsys):
    """Every layout a user has: the archive as downloaded, the extracted folder, and both
    (what torchvision's download leaves); pixel (y, x) of channel c is byte c*1024 + y*32 + x."""
    written = write_published_cifar(tmp_path / "both", name)
    write_published_cifar(tmp_path / "archive", name, extracted=False)
    write_published_cifar(tmp_path / "folder", name, archive=False)
    train, test = [f for f in written if "test" not in f], [f for f in written if "test" in f]
    loaded = [load_cifar_pickles(name, tmp_path / layout) for layout in ("archive", "folder", "both")]
    for arrays in loaded:
        for x, y, files in ((arrays.train_x, arrays.train_y, train), (arrays.test_x, arrays.test_y, test)):
            rows = np.concatenate([written[f][0] for f in files])
            assert y.tolist() == sum((written[f][1] for f in files), [])
            for c in range(3):
                assert np.array_equal(x[..., c], rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32))
            assert x.flags.c_contiguous and x.dtype == np.uint8 and y.dtype == np.int64
        assert arrays.mean == loaded[0].mean and arrays.std == loaded[0].std
    out = capsys.readouterr().out
    assert f"{tmp_path / 'archive' / CIFAR_ARCHIVES[name]} (" in out  # the MD5 warning names the archive's member
    # An interrupted extraction: the archive is read while a file is missing from the folder, and
    # named while one is truncated.
    test_file = tmp_path / "both" / CIFAR_FILES[name][0] / test[0]
    whole = test_file.read_bytes()
    test_file.unlink()
    assert np.array_equal(load_cifar_pickles(name, tmp_path / "both").test_x, loaded[0].test_x)
    test_file.write_bytes(whole[:100])
    with pytest.raises(DataError, match=rf"{test[0]} is not a readable CIFAR archive .*; "
                                        rf"{tmp_path / 'both' / CIFAR_ARCHIVES[name]} is there too: delete "):
        load_cifar_pickles(name, tmp_path / "both")


def test_channel_stats_are_exact():
    from fractions import Fraction
    from kdlab.data import channel_stats
    images = np.random.default_rng(0).integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)
    images[..., 2] = 7  # a constant channel: std 1 (centred, not scaled)
    mean, std = channel_stats(images, chunk=5)
    values = images.reshape(-1, 3).astype(object)
    for c in range(2):
        m = Fraction(int(values[:, c].sum()), 255 * len(values))
        var = Fraction(int((values[:, c] ** 2).sum()), 255 ** 2 * len(values)) - m * m
        assert mean[c] == float(m) and abs(std[c] - float(var) ** 0.5) <= 1e-16
    assert mean[2] == 7 / 255 and std[2] == 1.0


def test_broken_archives_and_misplaced_cifar_are_named(tmp_path):
    import gzip
    written = write_published_cifar(tmp_path, "Cifar100", extracted=False)
    archive = tmp_path / "cifar-100-python.tar.gz"
    whole = archive.read_bytes()
    archive.write_bytes(gzip.decompress(whole))  # some browsers unzip a download and keep its name
    assert load_cifar_pickles("Cifar100", tmp_path).train_y.tolist() == written["train"][1]
    archive.write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(DataError, match=rf"{archive} is not a readable tar.gz archive .*delete it and download"):
        load_cifar_pickles("Cifar100", tmp_path)
    archive.write_bytes(b"<html>404</html>")
    with pytest.raises(DataError, match="not a readable tar.gz"):
        load_cifar_pickles("Cifar100", tmp_path)
    archive.unlink()
    # CIFAR-10's folder given for CIFAR-100, and data_dir naming the dataset's folder itself
    write_published_cifar(tmp_path, "Cifar10", archive=False)
    with pytest.raises(DataError, match=r"cifar-100-python/train is missing.* holds Cifar10 \(cifar-10-batches-py\): "
                                        r"is data.dataset meant to be Cifar10\?"):
        load_cifar_pickles("Cifar100", tmp_path)
    with pytest.raises(DataError, match=rf"data.data_dir is the dataset's folder itself: set it to the folder above, "
                                        rf"{tmp_path}$"):
        load_cifar_pickles("Cifar10", tmp_path / "cifar-10-batches-py")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "cifar-100-binary.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"holds cifar-100-binary.tar.gz: kdlab reads the python version, not that one"):
        load_cifar_pickles("Cifar100", tmp_path / "binary")
    # CIFAR-10 batches put where CIFAR-100's files go
    (tmp_path / "cifar-100-python").mkdir()
    for ours, theirs in (("train", "data_batch_1"), ("test", "test_batch")):
        (tmp_path / "cifar-100-python" / ours).write_bytes((tmp_path / "cifar-10-batches-py" / theirs).read_bytes())
    with pytest.raises(DataError, match=r"cifar-100-python/train has no b'fine_labels' \(it holds .*b'labels'.*\): "
                                        r"not a Cifar100 file"):
        load_cifar_pickles("Cifar100", tmp_path)


def test_a_pending_download_happens_once_before_any_job(tmp_path, monkeypatch):
    """Snakemake's onstart downloads (check_data(..., download=True)), so that jobs, maybe on
    compute nodes without a network and many at once, only read; check-config does not."""
    import torchvision.datasets
    calls = []

    def fake_download(root, train, download):
        calls.append(root)
        write_published_cifar(Path(root), "Cifar100", archive=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    cfg = {"dataset": "Cifar100", "data_dir": str(tmp_path), "download": True}
    check_data(cfg)  # kdlab check-config: pending, nothing fetched
    assert calls == []
    check_data(cfg, download=True)
    assert calls == [str(tmp_path)] and (tmp_path / "cifar-100-python" / "train").exists()
    check_data(cfg, download=True)  # there now: read, not fetched again
    assert len(calls) == 1
    shutil.rmtree(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"half a download")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError, match=r"failed \(OSError: offline\).*cifar-100-python.tar.gz is there, but its "
                                        r"MD5 is not the published file's"):
        check_data(cfg, download=True)
