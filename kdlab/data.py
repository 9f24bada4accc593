"""Datasets (Cifar10, Cifar100, Synthetic, npz) and their loaders.

Images are kept as uint8 (N, 32, 32, 3) arrays; loaders yield uint8 NCHW batches and
the training loop normalises on the device (less to copy, one place to do it).
Augmentation (random crop 32 with zero padding `data.augmentation.crop_padding`, default 4,
and a horizontal flip unless `data.augmentation.horizontal_flip` is false) is drawn by the
sampler from a generator seeded with (seed, epoch), not inside worker processes, so
an epoch's batches are the same with any num_workers and after a resume.
"""

import hashlib
import math
import os
import pickle
import signal
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DATASETS = ("Cifar10", "Cifar100", "Synthetic", "npz")
CIFAR_FILES = {
    "Cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "Cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
# The published files' MD5s, as torchvision.datasets.CIFAR10/CIFAR100 list them. A pickle
# has no checksum of its own: flipped bytes in an image still load.
CIFAR_MD5 = {
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
# The archives as published, under the names they are published with.
CIFAR_ARCHIVES = {"Cifar10": "cifar-10-python.tar.gz", "Cifar100": "cifar-100-python.tar.gz"}
# The binary and MATLAB versions published beside the python one (folders and archives).
CIFAR_OTHER_VERSIONS = {
    "Cifar10": ("cifar-10-batches-bin", "cifar-10-binary.tar.gz", "cifar-10-batches-mat", "cifar-10-matlab.tar.gz"),
    "Cifar100": ("cifar-100-binary", "cifar-100-binary.tar.gz", "cifar-100-matlab", "cifar-100-matlab.tar.gz"),
}
CIFAR_URL_HINT = {
    "Cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "Cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
# data.augmentation's defaults (the schema states them too; a test keeps the two equal).
DEFAULT_AUGMENTATION = {"crop_padding": 4, "horizontal_flip": True}
PAD = DEFAULT_AUGMENTATION["crop_padding"]
# The arrays an npz file must hold, each under any one of its names (ours, then Keras's).
NPZ_KEYS = {"train_x": ("train_x", "x_train"), "train_y": ("train_y", "y_train"),
            "test_x": ("test_x", "x_test"), "test_y": ("test_y", "y_test")}
MAX_CLASSES = 100000  # the schema's maximum for data.num_classes


class DataError(Exception):
    """Missing or malformed data; the message names the file."""


class ImageArrays:
    """Train and test images (uint8 N,32,32,3) and labels (int64), with normalisation stats."""

    def __init__(self, train_x, train_y, test_x, test_y, num_classes, source):
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            if len(x) == 0:
                raise DataError(f"{source}: the {split} split holds no images")
            if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
                raise DataError(f"{source}: {split} images must be uint8 of shape (N, 32, 32, 3), "
                                f"got {x.dtype} {x.shape}")
            if y.shape != (len(x),):
                raise DataError(f"{source}: {split} labels must have shape ({len(x)},), got {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                raise DataError(f"{source}: {split} labels must lie in [0, {num_classes}), "
                                f"found {y.min()}..{y.max()}")
        self.train_x, self.train_y = train_x, train_y.astype(np.int64)
        self.test_x, self.test_y = test_x, test_y.astype(np.int64)
        self.num_classes = num_classes
        self.mean, self.std = channel_stats(train_x)

    def sha256(self, splits=("train", "test")):
        """Of the images and labels of `splits`: both are what a checkpoint was trained and
        tested on; the training split is what a teacher cache was computed from."""
        h = hashlib.sha256()
        for split in splits:
            for array in (getattr(self, f"{split}_x"), getattr(self, f"{split}_y")):
                h.update(np.ascontiguousarray(array).data)  # the buffer itself: no copy of the images
        return h.hexdigest()


def channel_stats(images, chunk=2048):
    """Per-channel mean and standard deviation of uint8 (N, 32, 32, 3) images on the 0..1 scale,
    exact up to the final rounding: from each channel's histogram of values, counted over
    chunks of images. (A float64 copy of CIFAR's 150 M values took 1.2 GB, three times over,
    and 12 s, in every job.)"""
    counts, offsets = np.zeros(3 * 256, np.int64), np.arange(3) * 256  # channel c's value v at c*256 + v
    for start in range(0, len(images), chunk):
        counts += np.bincount((images[start:start + chunk].reshape(-1, 3) + offsets).ravel(), minlength=3 * 256)
    values, n = np.arange(256), len(images) * 32 * 32
    mean, std = [], []
    for channel in counts.reshape(3, 256):
        total, squares = int(channel @ values), int(channel @ values ** 2)
        mean.append(total / (255 * n))
        # Normalisation divides by the std: a constant channel (say, grayscale stored in red
        # only) is centred and left unscaled instead of turning every input into NaN.
        std.append(math.sqrt((n * squares - total ** 2) / (255 * n) ** 2) or 1.0)
    return mean, std


def load_cifar_pickles(name, data_dir, download=False):
    """CIFAR's python version from `data_dir`: the extracted folder (cifar-100-python/ or
    cifar-10-batches-py/) if it holds every file, else the archive as published
    (cifar-100-python.tar.gz, cifar-10-python.tar.gz), read without extracting it."""
    folder, train_files, test_files, label_key = CIFAR_FILES[name]
    root = Path(data_dir) / folder
    archive = Path(data_dir) / CIFAR_ARCHIVES[name]
    if download and not root.exists():  # torchvision extracts an archive of the published MD5, else downloads
        import torchvision.datasets as tvd
        try:
            (tvd.CIFAR10 if name == "Cifar10" else tvd.CIFAR100)(str(data_dir), train=True, download=True)
        except Exception as e:  # URLError, timeouts, a full disk, a bad checksum: torchvision raises them all
            raise DataError(f"{name}: data.download is true, but downloading {CIFAR_URL_HINT[name]} into "
                            f"{data_dir} failed ({type(e).__name__}: {e}). Download it where there is a network "
                            f"and put it (or its extracted folder) into {data_dir}/"
                            + (f" ({archive} is there, but its MD5 is not the published file's: an interrupted "
                               f"download?)" if archive.exists() else "")) from None
    # The folder unless it is incomplete (an interrupted extraction) and the archive is there.
    if all((root / file).exists() for file in train_files + test_files) or not archive.exists():
        source, fetch = root, lambda file: read_cifar_file(name, data_dir, root / file)
    else:
        source, fetch = archive, read_cifar_archive(name, archive, folder, train_files + test_files).pop

    def read(files):
        xs, ys = [], []
        for file in files:
            where = root / file if source == root else f"{archive} ({folder}/{file})"
            raw = fetch(file)
            try:
                batch = pickle.loads(raw, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
            except Exception as e:
                raise DataError(f"{name}: {where} is not a readable CIFAR archive ({type(e).__name__}: {e})"
                                + (f"; {archive} is there too: delete {root}/ and it is read instead"
                                   if source == root and archive.exists() else "")) from None
            if label_key not in batch:  # CIFAR-10's batches say b"labels", CIFAR-100's b"fine_labels"
                raise DataError(f"{name}: {where} has no {label_key!r} (it holds {', '.join(map(repr, batch))}): "
                                f"not a {name} file")
            labels = np.asarray(batch[label_key], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise DataError(f"{name}: {where} holds data of shape {data.shape} with {len(labels)} "
                                f"labels; expected (N, 3072) with N labels")
            if hashlib.md5(raw, usedforsecurity=False).hexdigest() != CIFAR_MD5[f"{folder}/{file}"]:
                # A warning, not an error: a file of one's own in CIFAR's format is legitimate.
                print(f"WARNING: {where} is not the published {name} file (its MD5 differs): a damaged download, "
                      f"or a file of your own", flush=True)
            del raw, batch  # from the folder, one file's bytes at a time (CIFAR-100's train file is 155 MB)
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are R, G, B planes (CHW)
            ys.append(labels)
        images = np.empty((sum(map(len, xs)), 32, 32, 3), np.uint8)  # NHWC in memory: one copy, no temporary
        return np.concatenate(xs, out=images), np.concatenate(ys)

    num_classes = 10 if name == "Cifar10" else 100
    return ImageArrays(*read(train_files), *read(test_files), num_classes, str(source))


def read_cifar_file(name, data_dir, path):
    folder, train_files, test_files, _ = CIFAR_FILES[name]
    if not path.exists():
        from_where = "" if path.is_absolute() else f" (from {Path.cwd()})"
        raise DataError(
            f"{name}: {path}{from_where} is missing. Put the python version of the dataset ({CIFAR_URL_HINT[name]}) "
            f"in {Path(data_dir)}/, as the archive {CIFAR_ARCHIVES[name]} or extracted (so that "
            f"{Path(data_dir) / folder}/ holds {', '.join(train_files + test_files)}), or set data.download: "
            f"true where the network allows.{cifar_hint(name, Path(data_dir))}")
    try:
        raw = path.read_bytes()
    except OSError as e:  # a directory, no permission
        raise DataError(f"{name}: {path} cannot be read ({e.strerror})") from None
    if not raw:
        raise DataError(f"{name}: {path} is empty")
    return raw


def cifar_hint(name, data_dir):
    """Why a CIFAR file may be missing where the user put the data: the likely mistakes."""
    folder, wanted, _, _ = CIFAR_FILES[name]
    if data_dir.name == folder and (data_dir / wanted[0]).exists():
        return f" data.data_dir is the dataset's folder itself: set it to the folder above, {data_dir.parent}"
    for other, (other_folder, _, _, _) in CIFAR_FILES.items():
        if other != name and ((data_dir / other_folder).exists() or (data_dir / CIFAR_ARCHIVES[other]).exists()):
            return f" {data_dir} holds {other} ({other_folder}): is data.dataset meant to be {other}?"
    other_versions = [p.name for p in (data_dir / n for n in CIFAR_OTHER_VERSIONS[name]) if p.exists()]
    if other_versions:
        return f" {data_dir} holds {', '.join(other_versions)}: kdlab reads the python version, not that one"
    return ""


def read_cifar_archive(name, archive, folder, files):
    """The bytes of `files` from the published tar.gz (its members are `folder`/file), in one pass."""
    wanted, blobs = {f"{folder}/{file}": file for file in files}, {}
    try:
        with tarfile.open(archive, "r|*") as tar:  # a stream, read once; also a tar a browser already unzipped
            for member in tar:
                file = wanted.get(member.name.removeprefix("./"))
                if file and member.isfile():
                    blobs[file] = tar.extractfile(member).read()
    except Exception as e:  # truncated (EOFError, ReadError), not gzip, not a tar, unreadable
        raise DataError(f"{name}: {archive} is not a readable tar.gz archive ({type(e).__name__}: {e}); "
                        f"delete it and download {CIFAR_URL_HINT[name]} again") from None
    missing = [f"{folder}/{file}" for file in files if file not in blobs]
    if missing:
        raise DataError(f"{name}: {archive} lacks {', '.join(missing)}: not the python version of {name} "
                        f"({CIFAR_URL_HINT[name]})")
    return blobs


def make_synthetic(num_classes, train_size, test_size, seed, noise=40.0, contrast=1.0):
    """A learnable CIFAR-shaped task: each class is a smooth random colour pattern plus noise.

    `contrast` < 1 pulls every class pattern towards their common mean (classes look more
    alike) and `noise` is the pixel noise's standard deviation: both make the task harder.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    if contrast != 1.0:
        shared = coarse.mean(0)
        coarse = shared + contrast * (coarse - shared)
    prototypes = coarse.repeat(8, axis=1).repeat(8, axis=2)  # 32x32 blocky class patterns

    def draw(n):
        labels = rng.integers(0, num_classes, size=n)
        noise_pixels = rng.normal(0, noise, size=(n, 32, 32, 3))
        return np.clip(prototypes[labels] + noise_pixels, 0, 255).astype(np.uint8), labels

    return ImageArrays(*draw(train_size), *draw(test_size), num_classes, f"Synthetic(seed={seed})")


def load_npz(path, num_classes=None):
    path = Path(path)
    wanted = ", ".join(" or ".join(names) for names in NPZ_KEYS.values())
    if not path.exists():
        raise DataError(f"npz dataset: {path} is missing; it must hold the arrays {wanted} "
                        f"(uint8 images N,32,32,3 and integer labels)")
    try:
        with np.load(path) as f:
            found = {k: next((n for n in names if n in f.files), None) for k, names in NPZ_KEYS.items()}
            missing = [" or ".join(NPZ_KEYS[k]) for k, name in found.items() if name is None]
            if missing:
                raise DataError(f"npz dataset: {path} lacks array(s) {', '.join(missing)}; it holds "
                                f"{', '.join(f.files) or 'no arrays'}, and must hold {wanted}")
            arrays = {k: f[name] for k, name in found.items()}
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"npz dataset: {path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    for key in ("train_y", "test_y"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise DataError(f"npz dataset: {path}: {key} must hold integer labels, got {arrays[key].dtype}")
    largest = int(max(arrays["train_y"].max(initial=0), arrays["test_y"].max(initial=0)))
    images = ImageArrays(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                         largest + 1 if num_classes is None else num_classes, str(path))
    if num_classes is None and not 2 <= largest + 1 <= MAX_CLASSES:  # a given num_classes has the schema's bounds
        raise DataError(f"npz dataset: {path}: labels go up to {largest}; they must be 0..K-1 with K from 2 to "
                        f"{MAX_CLASSES}")
    return images


def load_dataset(cfg):
    name = cfg["dataset"]
    if name in CIFAR_FILES:
        return load_cifar_pickles(name, cfg["data_dir"], cfg["download"])
    if name == "Synthetic":
        s = cfg["synthetic"]
        return make_synthetic(s["num_classes"], s["train_size"], s["test_size"], s["seed"], s["noise"], s["contrast"])
    if name == "npz":
        return load_npz(cfg["npz_path"], cfg.get("num_classes"))
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def check_data(cfg, download=False):
    """Raise DataError unless the configured data loads (exists, is readable, has the keys,
    shapes and labels it must): the loader's own checks, before any job. CIFAR-100 takes
    a few seconds. A CIFAR set whose download is pending (data.download) is skipped, or,
    with `download`, fetched now: once, before any job, and where Snakemake runs (a cluster's
    compute nodes may have no network, and jobs downloading at once write over each other)."""
    if cfg["dataset"] == "Synthetic":
        return  # generated: nothing to read
    if download_pending(cfg) and not download:
        return
    load_dataset({**cfg, "download": download and cfg["download"]})


def download_pending(cfg):
    """Whether a CIFAR set configured with data.download is not in data_dir yet (neither
    extracted nor as the archive)."""
    name = cfg["dataset"]
    return name in CIFAR_FILES and cfg["download"] and not any(
        (Path(cfg["data_dir"]) / f).exists() for f in (CIFAR_FILES[name][0], CIFAR_ARCHIVES[name]))


class AugmentingSampler(Sampler):
    """Yields (index, dy, dx, flip) for a shuffled epoch, all drawn from (seed, epoch):
    dy, dx in 0..2*padding, flip 0 or 1 (always 0 without horizontal flips)."""

    def __init__(self, size, seed, padding=PAD, horizontal_flip=DEFAULT_AUGMENTATION["horizontal_flip"]):
        self.size, self.seed, self.epoch = size, seed, 0
        self.padding, self.horizontal_flip = padding, horizontal_flip

    def __len__(self):
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)
        shifts = torch.randint(0, 2 * self.padding + 1, (self.size, 2), generator=g)
        flips = torch.randint(0, 2, (self.size,), generator=g) * self.horizontal_flip
        return iter(zip(order.tolist(), shifts[:, 0].tolist(), shifts[:, 1].tolist(), flips.tolist()))


class ImageDataset(Dataset):
    """Items are (uint8 CHW image, label, view); a key (i, dy, dx, flip) crops a zero-padded
    image (padding `padding`) and flips it. `view` is the int64 tensor (i, dy, dx, flip) that made
    the item (the plain image is (i, padding, padding, 0)): methods that need each sample's dataset index, and
    anything that caches per-view outputs, read it from the batch."""

    def __init__(self, images, labels, padding=PAD):
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, dy, dx, flip = key
            out = np.zeros_like(self.images[i])
            # Window [dy-padding, dy-padding+32) of the original image, zeros outside it.
            y0, x0 = dy - self.padding, dx - self.padding
            src = self.images[i][max(y0, 0):32 + min(y0, 0), max(x0, 0):32 + min(x0, 0)]
            out[max(-y0, 0):max(-y0, 0) + src.shape[0], max(-x0, 0):max(-x0, 0) + src.shape[1]] = src
            if flip:
                out = out[:, ::-1]
        else:
            (i, dy, dx, flip), out = (key, self.padding, self.padding, 0), self.images[key]
        view = torch.tensor((i, dy, dx, flip), dtype=torch.int64)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), int(self.labels[i]), view


def exit_quietly_on_sigterm(worker_id):
    """A loader worker ends with exit status 0 on SIGTERM, whoever sends it. A PBS walltime
    kill, qdel and Snakemake signal every process of the job, workers included; torch's own
    handler lets a worker die of a SIGTERM its parent did not send, and the parent then fails
    with "DataLoader worker killed by signal" instead of stopping cleanly."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def make_loaders(arrays, batch_size, num_workers, seed, pin_memory, eval_batch_size=None, augmentation=None):
    """Train loader (augmented, reshuffled per epoch via sampler.epoch) and test loader;
    augmentation is the config's data.augmentation block (default: padding 4, flips)."""
    augmentation = {**DEFAULT_AUGMENTATION, **(augmentation or {})}
    padding = augmentation["crop_padding"]
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                  worker_init_fn=exit_quietly_on_sigterm)
    sampler = AugmentingSampler(len(arrays.train_x), seed, padding, augmentation["horizontal_flip"])
    train = DataLoader(ImageDataset(arrays.train_x, arrays.train_y, padding), batch_size=batch_size,
                       sampler=sampler, **common)
    test = DataLoader(ImageDataset(arrays.test_x, arrays.test_y, padding), batch_size=eval_batch_size or 2 * batch_size,
                      shuffle=False, **common)
    return train, test
