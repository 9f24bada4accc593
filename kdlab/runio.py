"""Run-directory files: atomic writes, checkpoints, provenance.

torch is imported only by the functions that need it, so that the results tool can
use the atomic writes without loading torch.
"""

import contextlib
import copy
import datetime
import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from . import __version__


class Busy(Exception):
    """Another process holds the lock of the run or file that a command would work on."""


# The fds of the locks this process holds. A child it forks (a DataLoader worker) gets copies of them,
# and flock() holds until the last copy is closed: the child closes its own, so that the lock ends with
# the process that took it (a SIGKILLed job's workers linger for seconds, or while a hung file system
# keeps them).
HELD_LOCKS = set()


def close_held_locks():
    for fd in HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD_LOCKS.clear()


os.register_at_fork(after_in_child=close_held_locks)


@contextlib.contextmanager
def exclusive(target):
    """Hold the lock of `target` (a run directory or an output file) while working on it. A
    second process that would work on the same files (a job left running by an earlier
    workflow, or two workflows, say two checkouts, that share an experiments_dir) stops at
    once with Busy, naming the holder, and touches nothing. The lock is flock()'s, on the file
    .NAME.lock beside `target` (which stays): the kernel, or the file system's lock server
    (Lustre mounted with flock, NFS), drops it when its process ends however it ends, so a
    killed job leaves no stale lock. Where it cannot be taken (Lustre mounted noflock, NFS
    without lockd, a lock file this user may neither make nor, on NFS, write) the work goes
    on unlocked, after a warning."""
    target = Path(os.path.realpath(target))  # `--run-dir .` has a name too; a symlinked run has its target's lock
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.with_name(f".{target.name}.lock")
    fd, writable = None, True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError as refused:  # another user's lock file: flock needs no write, except on NFS (below)
        writable = False
        with contextlib.suppress(OSError):  # none, and none may be made here (a directory this user may only read)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if fd is None:
            warn_unlocked(path, refused.strerror)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "which, its lock file does not say"
            if not writable:  # a holder that could not write it either left an earlier one's line
                holder = f"as last written by one that could write the lock file: {holder}"
            raise Busy(f"{target} is in use by another process ({holder}), and is left as it is: a job of an earlier "
                       f"workflow still running, or two workflows (two checkouts or --directory values) sharing "
                       f"this experiments_dir; run this again once that one has ended") from None
        except OSError as e:
            # NFS emulates flock with byte-range locks, whose exclusive lock needs a file open for writing (EBADF).
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK) and (writable or e.errno != errno.EBADF):
                raise
            warn_unlocked(path, e.strerror if writable else "this user may not write it, and this file system "
                                                           "(NFS) locks only files open for writing")
        else:
            job = os.environ.get("PBS_JOBID")
            holder = f"host {socket.gethostname()} pid {os.getpid()}{f' PBS job {job}' if job else ''} since {now()}"
            with contextlib.suppress(OSError):  # it only says who holds the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode() + b"\n", 0)
                os.fsync(fd)
        HELD_LOCKS.add(fd)
        yield
    finally:
        HELD_LOCKS.discard(fd)
        os.close(fd)


def warn_unlocked(path, reason):
    print(f"kdlab: warning: cannot lock {path} ({reason}); working without the lock that keeps a second "
          f"process off the same files", file=sys.stderr)


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path, write):
    """write(f) to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = create_temporary(path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        # A full disk says "[Errno 28] No space left on device" without naming the file, and
        # torch's zip writer reports it as a RuntimeError raised while handling the OSError.
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e
        raise


def create_temporary(path):
    """(fd, path) of a new file .NAME.XXXXXXXX.tmp beside `path`, with the mode a plain open() gives
    it: 0666 through the umask, or through the directory's default ACL where it has one (a group's
    shared directory). mkstemp's 0600, even chmod-ed to 0666 & ~umask afterwards, hid the results
    from the group there."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def remove_temporaries(directory, name=None, min_age_s=0):
    """Remove the temporary files of atomic_write and save_checkpoint (of file `name`, or of
    every file) that a kill left in `directory`, those at least `min_age_s` old (younger ones
    may be a concurrent writer's); return them."""
    stale = []
    for path in Path(directory).glob(f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"):
        try:
            if time.time() - path.stat().st_mtime >= min_age_s:
                path.unlink()
                stale.append(path)
        except FileNotFoundError:  # removed meanwhile by its writer
            pass
    return stale


def finite_or_null(obj):
    """obj with every NaN or infinity replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_sha256(record):
    """SHA-256 of a run file's record (metrics.json, progress.json) without its "sha256" key: the record as
    compact strict JSON with sorted keys, which the parsed file gives back exactly (kdlab results checks it
    without torch). A bit flipped in a number leaves valid JSON, read as another result without it."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()).hexdigest()


def json_intact(record):
    """Whether a run file's record matches its checksum; files of a kdlab before checksums have none."""
    return "sha256" not in record or record["sha256"] == json_sha256(record)


def checksummed(record):
    """`record` with the checksum of the rest of its content under "sha256" (its last key)."""
    return {**{k: v for k, v in record.items() if k != "sha256"}, "sha256": json_sha256(record)}


def atomic_write_json(path, obj):
    """A run file, strict JSON; a dict gets the checksum of the rest of its content under "sha256"."""
    obj = finite_or_null(obj)
    if isinstance(obj, dict):
        obj = checksummed(obj)
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def atomic_torch_save(path, obj):
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))  # straight to the file: no copy of a GB-sized cache in memory


class UnreadableFile(Exception):
    pass


def torch_load(path, mmap=False):
    """Load a file saved by this package (weights_only=True), with a clear error if it is damaged;
    mmap=True maps the tensors instead of reading them (the GB-sized teacher cache)."""
    import torch
    if not Path(path).exists():
        raise UnreadableFile(f"{path} does not exist")
    if Path(path).is_dir():
        raise UnreadableFile(f"{path} is a directory, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as e:
        # torch's zip reader seeks back 64 KiB from the end for the archive's directory: in a
        # file cut to between about 1 and 64 KiB that seek is negative, and it raises EINVAL.
        if e.errno != errno.EINVAL or zipfile.is_zipfile(path):
            raise  # an I/O failure is not a damaged file: never a reason to start over
        raise UnreadableFile(f"{path} is truncated or corrupt and cannot be loaded (no zip archive's "
                             f"directory in its {Path(path).stat().st_size} bytes)") from None
    except Exception as e:
        detail = (str(e).splitlines() or ["empty file" if Path(path).stat().st_size == 0 else "no detail"])[0]
        raise UnreadableFile(f"{path} is truncated or corrupt and cannot be loaded "
                             f"({type(e).__name__}: {detail[:200]})") from None


# --- checksums ----------------------------------------------------------------------
# Dict files that only kdlab reads (checkpoints, paraphraser.pth) carry the SHA-256 of
# their content under "sha256"; model.pth stays a plain state_dict for users, and its
# file's SHA-256 is in the sidecar model.pth.sha256 (`sha256sum -c` format).

def content_sha256(obj):
    """SHA-256 of nested dicts/lists/tensors/scalars, independent of how torch serialises them."""
    import torch
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}:".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def save_checked(path, obj):
    """atomic_torch_save of a dict with the checksum of its content added."""
    atomic_torch_save(path, {**obj, "sha256": content_sha256(obj)})


def load_checked(path):
    """A dict written by save_checked; UnreadableFile if it is damaged or its checksum differs."""
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise UnreadableFile(f"{path} is not a file written by kdlab (it holds a {type(obj).__name__})")
    if "sha256" not in obj:
        print(f"WARNING: {path} was written before kdlab checksummed its files; it cannot be verified", flush=True)
        return obj
    saved = obj.pop("sha256")
    if content_sha256(obj) != saved:
        raise UnreadableFile(f"{path} is corrupt: its content does not match its checksum")
    return obj


def save_weights(path, state_dict):
    """Final weights: a plain state_dict, then the sidecar PATH.sha256 with the file's checksum."""
    atomic_torch_save(path, on_cpu(state_dict))
    path = Path(path)
    atomic_write_bytes(checksum_path(path), f"{file_sha256(path)}  {path.name}\n".encode())


def on_cpu(state_dict):
    """A state dict (its type and metadata kept) with its tensors on the CPU. torch.save records each
    tensor's device: a weights file of CUDA tensors fails a plain torch.load on a machine without a GPU,
    and its bytes, whose SHA-256 is part of the fingerprint of every run that reads it, would depend on
    the device that wrote it."""
    copied = copy.copy(state_dict)
    for key, value in copied.items():
        copied[key] = value.cpu()  # a CPU tensor stays itself
    return copied


def checksum_path(path):
    return Path(path).with_name(Path(path).name + ".sha256")


def remove_completion_marks(run_dir):
    """Before a run starts afresh: a previous run's final weights, their checksum and metrics.json."""
    weights = Path(run_dir) / "model.pth"
    for stale in (Path(run_dir) / "metrics.json", weights, checksum_path(weights)):
        stale.unlink(missing_ok=True)


def verify_weights(path):
    """The checksum of weights written by save_weights, after checking it; UnreadableFile if
    the file or its sidecar is missing or they disagree."""
    path, sidecar = Path(path), checksum_path(path)
    if not path.exists():
        raise UnreadableFile(f"{path} does not exist")
    actual = file_sha256(path)
    if not os.path.lexists(sidecar):  # a link to nothing is damaged, and read below
        print(f"WARNING: {path} has no checksum file {sidecar.name} (written before kdlab checksummed its "
              f"files); it cannot be verified", flush=True)
        return actual
    expected = (sidecar.read_bytes().decode("utf-8", "replace").split() or [""])[0]
    if actual != expected:
        raise UnreadableFile(f"{path} or its checksum file {sidecar.name} is corrupt: the SHA-256 of {path.name} "
                             f"does not match the one recorded")
    return actual


def previous_path(path):
    """checkpoint.pth -> checkpoint.prev.pth: the one before the latest is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path, obj):
    """Keep the last two: the current checkpoint also becomes the previous one (a hard link,
    so that at no instant is there no checkpoint), then the new one replaces it."""
    path, previous = Path(path), previous_path(path)
    # After a kill between the two steps both names are one file already, and rename()
    # between two links of one file does nothing (POSIX): the temporary link would stay.
    if path.exists() and not (previous.exists() and os.path.samefile(path, previous)):
        tmp = path.with_name(f".{path.name}.prev.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
    save_checked(path, obj)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def code_sha256():
    """What trains a run: kdlab's source (the results tool aside) and torch's version. A
    finished checkpoint stands for its run only under the same code."""
    import torch
    package = Path(__file__).resolve().parent
    h = hashlib.sha256(torch.__version__.encode())
    for source in sorted(package.rglob("*.py")):
        parts = source.relative_to(package).parts
        # Not hidden files (an editor's lock file `.#train.py` is a dangling link) nor the results tool.
        if "results" in parts or any(p.startswith(".") for p in parts) or not source.is_file():
            continue
        h.update("/".join(parts).encode() + b"\0" + source.read_bytes())
    return h.hexdigest()


def now():
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def git_state():
    """(commit, dirty) of the git checkout whose tracked files kdlab runs from (also a larger
    repository holding kdlab); (None, None) for a copy git does not track: a tarball, or a
    `pip install .` inside another repository (a dotfiles home, the checkout's own .venv),
    must not report that repository's commit."""
    here = Path(__file__).resolve()
    repo = here.parent.parent
    # Read-only: a plain `git status` takes .git/index.lock to refresh the index, and hundreds of
    # cluster jobs starting at once would make the user's own git commands fail on that lock.
    # (The variable, not --no-optional-locks: a git older than 2.15 ignores it instead of failing.)
    git = {"capture_output": True, "text": True, "timeout": 10, "env": {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}}
    try:
        if subprocess.run(["git", "-C", str(here.parent), "ls-files", "--error-unmatch", "--", here.name],
                          **git).returncode != 0:
            return None, None
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], **git).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               **git).stdout.strip() != ""
        return commit, dirty if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(device, started, data_sha256):
    """Where a run comes from. code_sha256 and data_sha256 tie it to its code and data also
    where there is no git checkout (a copy rsynced to the cluster). The thread count, CUDA
    and cuDNN change a run's float rounding, so its bits."""
    import numpy
    import torch
    commit, dirty = git_state()
    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else device.type
    return {"git_commit": commit, "git_dirty": dirty, "package_version": __version__,
            "code_sha256": code_sha256(), "data_sha256": data_sha256,
            "torch_version": str(torch.__version__), "python_version": platform.python_version(),
            "numpy_version": numpy.__version__, "threads": torch.get_num_threads(),
            "cuda_version": torch.version.cuda if cuda else None,
            "cudnn_version": torch.backends.cudnn.version() if cuda else None,
            "device": device_name, "host": socket.gethostname(),
            "started": started, "finished": None, "pbs_job_id": os.environ.get("PBS_JOBID")}
