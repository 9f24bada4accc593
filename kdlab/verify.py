"""`kdlab verify`: every run's final weights against their checksum file, without torch.

Jobs check a teacher's weights whenever they load them, but nothing reads a student's
model.pth again once its run is complete: a damaged one (a failing disk, a bad copy)
would go unnoticed, and `kdlab results` does not read weights (it stays cheap).
"""

import os

from .results.runs import scan_runs
from .runio import UnreadableFile, checksum_path, verify_weights

MEND = ("delete each damaged model.pth and run snakemake again: a complete run writes it (and its checksum "
        "file) anew from its finished checkpoint, the same bytes, without training; the jobs that read a "
        "teacher's weights are rerun too, also without training")


def weights_files(experiments):
    """The model.pth of every run below `experiments` (the runs kdlab results finds), whatever it now is."""
    for rel, _ in scan_runs(experiments):
        path = os.path.join(experiments, rel, "model.pth")
        if os.path.lexists(path):
            yield path


def verify(experiments):
    """Prints what is damaged or cannot be checked; returns the exit status (1 if anything is damaged)."""
    checked, damaged, unchecked = 0, [], []
    for path in weights_files(experiments):
        checked += 1
        # Not a file (a directory, a dangling link), or a checksum file that is one: damaged, not unchecked.
        if os.path.isfile(path) and not os.path.lexists(checksum_path(path)):
            unchecked.append(path)
            continue
        try:
            verify_weights(path)
        except (UnreadableFile, OSError) as e:  # a mismatch, or a file that cannot be read (a directory, EIO)
            damaged.append(str(e))  # names the file
    print(f"kdlab verify: {checked} weights file(s) of the runs under {experiments}: {len(damaged)} damaged, "
          f"{len(unchecked)} without a checksum file")
    for line in damaged:
        print(f"  damaged: {line}")
    for path in unchecked:
        print(f"  no {checksum_path(path).name} (written before kdlab checksummed its files): {path}")
    if damaged:
        print(f"To mend: {MEND}.")
    return 1 if damaged else 0
