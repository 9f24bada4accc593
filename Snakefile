# kdlab: teachers -> (FT paraphrasers) -> distilled and plain students -> results.
#   snakemake --cores all                          # config/config.yaml
#   snakemake --cores all --configfile config/demo.yaml
# Rules are thin: each calls one `kdlab` command. See README.md and config/README.md.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

from kdlab.config import ConfigError, check_data_files, grid_warnings, read_yaml, resolve_grid, split_runtime
from kdlab.grid import expand_grid, logs_dir
from kdlab.layout import run_path
from kdlab.methods import METHODS, method_versions
from kdlab.models import BLOCKS_PER_STAGE
from kdlab import teacher_cache
from kdlab.snakemake_exit import shut_down_executors_at_exit

try:
    # Before `configfile:`, whose message for a YAML syntax error names no line (Snakemake reads a
    # --configfile before this file). Its loader also keeps the last of a key given twice; ours refuses it.
    for path in workflow.overwrite_configfiles or ["config/config.yaml"]:
        read_yaml(path)
    if not workflow.overwrite_configfiles:  # --configfile replaces the default, --config amends it
        configfile: "config/config.yaml"
    GRID = resolve_grid(config)  # the whole config is validated before any job is planned
    if workflow.is_main_process:  # once, not again in every cluster job
        for warning in grid_warnings(GRID):
            print(f"kdlab: warning: {warning}", file=sys.stderr)
except ConfigError as e:
    sys.exit(f"kdlab: {e}")  # the message alone, no stack of frames


onstart:
    # The data files (exist, readable, keys, shapes, labels) before any job runs; not in a
    # dry run, so that a grid can be planned before its data is downloaded. A download
    # (data.download) happens here, once, not in jobs.
    try:
        check_data_files(GRID, download=True)
    except ConfigError as e:
        sys.exit(f"kdlab: {e}")
JOBS = {job.outputs[0]: job for job in expand_grid(GRID)}
if workflow.is_main_process:
    shut_down_executors_at_exit()  # else the PBS profile never returns when there is nothing to do
    # A file that jobs read (teacher weights, cache, paraphraser) that is a symlink to nothing (its target on a purged
    # scratch, say) stops Snakemake with "Unable to obtain modification time ... a concurrent process has deleted it",
    # which says neither what nor what to do. (Other outputs are merely missing to it: their jobs rerun.)
    READ = {p for job in JOBS.values() for p in job.inputs}  # each once: a grid's jobs share their teachers' files
    DANGLING = sorted(p for p in READ if os.path.islink(p) and not os.path.exists(p))
    if DANGLING:
        sys.exit("kdlab: " + "; ".join(f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
                                       for p in DANGLING)
                 + ": remove the link (rm) and run snakemake again, which rebuilds the file")
EXP, RESULTS = GRID["experiments_dir"], GRID["results_dir"]
RES = GRID["resources"]


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/results.smk"


rule all:
    input:
        # Every run's outputs, not only the aggregate's: a deleted metrics.json is then a
        # missing target that gets rebuilt, even while the tables are up to date.
        [out for job in JOBS.values() for out in job.outputs],
        rules.aggregate.output,
    default_target: True
