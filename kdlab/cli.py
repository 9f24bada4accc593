"""The `kdlab` command: one subcommand per workflow step."""

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM (a PBS walltime or memory kill, qdel, Snakemake stopping its jobs), raised like
    Ctrl-C's KeyboardInterrupt so that both end a job the same way: its run marked
    interrupted, one line in its log, no traceback."""


def raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # PBS signals every process of the job, Snakemake its jobs: often two
    raise Terminated()


def read_run_config(text, option):
    """A run config given inline as JSON, or as the path of a YAML/JSON file: a mapping."""
    from .config import ConfigError, read_yaml
    if text.lstrip().startswith(("{", "[")):
        try:
            run = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{option} is not valid JSON: {e}") from None
    else:
        run = read_yaml(text, f"the {option} file") if text else None
    if not isinstance(run, dict):
        raise ConfigError(f"{option} must be a mapping of config keys (inline JSON or a YAML/JSON file), "
                          f"not {'nothing' if run is None else type(run).__name__}")
    return run


def full_run_config(args):
    """--config, with the blocks of --runtime (workers, device, data_dir: how, not what) merged in."""
    from .config import ConfigError
    run = read_run_config(args.config, "--config")
    if "pairs" in run:  # config/demo.yaml given to kdlab train: a likely first mistake
        raise ConfigError("--config is an experiment grid (it has 'pairs'): run it with snakemake (or check it with "
                          "kdlab check-config); this command takes one run's config, as snakemake passes it "
                          "(`snakemake -n -p --forcerun RUN/metrics.json` prints a run's command)")
    for block, values in (read_run_config(args.runtime, "--runtime") if args.runtime else {}).items():
        if not isinstance(values, dict) or not isinstance(run.get(block, {}), dict):
            raise ConfigError(f"--runtime: block {block!r} must be a mapping in both --runtime and --config")
        run[block] = {**run.get(block, {}), **values}
    return run


def output_file(text):
    """--out: checked before the work that would be written there."""
    if not text or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"must name a file, and {text!r} is {'a directory' if text else 'empty'}")
    return Path(text)


def run_directory(text):
    if not text or (Path(text).exists() and not Path(text).is_dir()):
        raise argparse.ArgumentTypeError(f"{text!r} is {'a file, not a directory' if text else 'empty'}")
    return Path(text)


def thread_count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def set_threads(args):
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


@contextlib.contextmanager
def writing_run(args, target):
    """The run config of a command that writes a run, with the lock of `target` held (runio.exclusive):
    taken before anything there is touched, so a refused job marks, removes and writes nothing of the
    holder's run."""
    from .runio import exclusive
    set_threads(args)
    run = full_run_config(args)
    with exclusive(target):
        yield run


def cmd_train(args):
    from .train import mark_interrupted, train
    with writing_run(args, args.run_dir) as run:
        try:
            train(run, args.run_dir, force_restart=args.force_restart)
        except KeyboardInterrupt as e:
            mark_interrupted(args.run_dir, "SIGTERM (walltime or memory kill, qdel, or Snakemake stopping)"
                             if isinstance(e, Terminated) else "Ctrl-C")
            raise
        except Exception as e:  # a full disk or quota, an I/O error, CUDA out of memory, a bug: said in
            # progress.json (a retry's log replaces this one's), so kdlab results shows why the run stopped
            message = (str(e).splitlines() or [""])[0][:300]
            cause = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {message}"
            try:
                mark_interrupted(args.run_dir, cause)
            except OSError:
                pass  # on a full disk, its write may fail too: the job's log still names the file
            raise
    return 0


def cmd_pretrain(args):
    from .pretrain import pretrain_paraphraser
    with writing_run(args, args.out) as run:
        pretrain_paraphraser(run, args.out, force_restart=args.force_restart)
    return 0


def cmd_import_teacher(args):
    from .teachers import import_teacher
    with writing_run(args, args.run_dir) as run:  # the same lock as training that teacher
        import_teacher(run, args.run_dir)
    return 0


def cmd_cache_teacher(args):
    from .teacher_cache import build
    # The lock of the teacher's run directory, where the cache lies: training or importing that
    # teacher removes every temporary file there, the cache's too.
    with writing_run(args, args.out.parent) as run:
        build(run, args.weights, args.out)
    return 0


def cmd_verify(args):
    from .verify import verify
    return verify(args.experiments)


def cmd_check_config(args):
    from .grid import expand_grid
    from .config import check_data_files, grid_warnings, load_grid
    from .data import download_pending
    grid = load_grid(args.config)
    check_data_files(grid)  # reads the data files; writes nothing anywhere
    for warning in grid_warnings(grid):
        print(f"kdlab check-config: warning: {warning}", file=sys.stderr)
    jobs = expand_grid(grid)
    counts = {}
    for job in jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    print(f"{args.config}: valid; " + ", ".join(f"{n} {rule}" for rule, n in counts.items()))
    if download_pending(grid["data"]):
        print(f"{args.config}: {grid['data']['dataset']} is not in {grid['data']['data_dir']} yet: snakemake "
              f"downloads it (data.download) before the first job, and checks it then")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="kdlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a teacher, a plain student or a distilled student (resumable)")
    p.add_argument("--config", required=True, help="the run config: inline JSON or a YAML/JSON file")
    p.add_argument("--runtime", help="JSON blocks merged over --config that do not change the result "
                   "(e.g. '{\"training\": {\"num_workers\": 8}}')")
    p.add_argument("--run-dir", required=True, type=run_directory, help="the run directory (checkpoint, metrics)")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--force-restart", action="store_true", help="ignore any checkpoint and start fresh")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-paraphraser", help="Factor Transfer stage 1: write paraphraser.pth")
    p.add_argument("--config", required=True, help="the run config (method ft): inline JSON or a file")
    p.add_argument("--runtime", help="JSON blocks merged over --config that do not change the result")
    p.add_argument("--out", required=True, type=output_file, help="where to write paraphraser.pth")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--force-restart", action="store_true", help="ignore any checkpoint and start fresh")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("import-teacher", help="a published teacher checkpoint (RepDistiller's layout or ours) "
                       "as a teacher run: converted model.pth, metrics.json with its test accuracy")
    p.add_argument("--config", required=True, help="the import's config (kind import_teacher, model, seed, "
                   "checkpoint, data): inline JSON or a file")
    p.add_argument("--runtime", help="JSON blocks merged over --config that do not change the result")
    p.add_argument("--run-dir", required=True, type=run_directory, help="the teacher's run directory")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_import_teacher)

    p = sub.add_parser("cache-teacher", help="the teacher's logits and embedding for all 162 views of every "
                       "training image (kdlab/teacher_cache.py)")
    p.add_argument("--config", required=True, help="a run config whose model is the teacher: inline JSON or a file")
    p.add_argument("--runtime", help="JSON blocks merged over --config that do not change the result")
    p.add_argument("--weights", required=True, type=Path, help="the teacher's model.pth")
    p.add_argument("--out", required=True, type=output_file, help="where to write the cache (beside the weights)")
    p.add_argument("--threads", type=thread_count, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("check-config", help="validate an experiment grid config and its data files, and count "
                       "its jobs (creates nothing on disk)")
    p.add_argument("config", help="e.g. config/config.yaml")
    p.set_defaults(func=cmd_check_config)

    from .results import add_parser as add_results_parser
    from .results.command import experiments_directory
    add_results_parser(sub)

    p = sub.add_parser("verify", help="check every run's model.pth against its model.pth.sha256 (no torch); "
                       "exit status 1 if one is damaged, with what to do")
    p.add_argument("experiments", nargs="?", default="experiments", type=experiments_directory,
                   help="experiments directory (default: %(default)s)")
    p.set_defaults(func=cmd_verify)
    return parser


def reported_errors():
    """The errors a command reports in one line, without a traceback (importing them imports torch)."""
    from .config import ConfigError
    from .data import DataError
    from .methods.ft import ParaphraserError
    from .runio import Busy, UnreadableFile
    from .teachers import ConversionError
    from .teacher_cache import TeacherCacheError
    from .guard import GuardError
    return ConfigError, ConversionError, DataError, ParaphraserError, UnreadableFile, GuardError, TeacherCacheError, \
        Busy, OSError


def main(argv=None):
    try:  # Ctrl-C reaches a job in its first second too, while torch imports: one line, no traceback
        args = build_parser().parse_args(argv)
        # results and verify report their own errors and import no torch (login nodes, cron)
        errors = () if args.command in ("results", "verify") else reported_errors()
    except KeyboardInterrupt:
        print("kdlab: interrupted while starting, before it wrote anything", file=sys.stderr)
        return 128 + signal.SIGINT
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return args.func(args)
    except errors as e:
        # A file of a run made a directory (by a damaged file system or a wrong cp -r) is named by the OSError alone.
        hint = ("; a file is expected there: if kdlab wrote it, remove the directory (rm -r) and run snakemake "
                "again, which writes the file anew") if isinstance(e, IsADirectoryError) else ""
        print(f"kdlab {args.command}: error: {e}{hint}", file=sys.stderr)
        from .config import ConfigError  # imported already, by reported_errors
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt as e:  # Ctrl-C reaches every job of the terminal: a line, not a traceback, in each log
        resumes = args.command in ("train", "pretrain-paraphraser", "cache-teacher")
        terminated = isinstance(e, Terminated)
        print(f"kdlab {args.command}: {'stopped by SIGTERM' if terminated else 'interrupted'}"
              + ("; what it saved is kept, and running it again resumes from there" if resumes else ""),
              file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)  # main() may be called in a longer-lived process


if __name__ == "__main__":
    sys.exit(main())
