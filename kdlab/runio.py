"""Run-directory files: atomic writes, checkpoints, provenance.

torch is imported only by the functions that need it, so that the results tool can
use the atomic writes without loading torch.
"""

import datetime
import hashlib
import io
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

from . import __version__


def file_mode():
    """The mode a plain open() would give (mkstemp's 0600 would hide results from the group)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path, data):
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode())


def atomic_torch_save(path, obj):
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class UnreadableFile(Exception):
    pass


def torch_load(path):
    """Load a file saved by this package (weights_only=True), with a clear error if it is damaged."""
    import torch
    if not Path(path).exists():
        raise UnreadableFile(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # an I/O failure is not a damaged file: never a reason to start over
    except Exception as e:
        raise UnreadableFile(f"{path} is truncated or corrupt and cannot be loaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def now():
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def git_state():
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return commit, dirty if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(device, started):
    import torch
    commit, dirty = git_state()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"git_commit": commit, "git_dirty": dirty, "package_version": __version__,
            "torch_version": torch.__version__, "device": device_name, "host": socket.gethostname(),
            "started": started, "finished": None, "pbs_job_id": os.environ.get("PBS_JOBID")}
