# kdlab: teachers -> (FT paraphrasers) -> distilled and plain students -> results.
#   snakemake --cores all                          # config/config.yaml
#   snakemake --cores all --configfile config/demo.yaml
# Rules are thin: each calls one `kdlab` command. See README.md and config/README.md.
import json
import shlex

from kdlab.config import resolve_grid
from kdlab.grid import expand_grid, split_runtime
from kdlab.methods import METHODS, method_versions
from kdlab.models import BLOCKS_PER_STAGE

if not config:
    configfile: "config/config.yaml"

GRID = resolve_grid(config)  # the whole config is validated before any job is planned
JOBS = {job.outputs[0]: job for job in expand_grid(GRID)}
EXP, RESULTS = GRID["experiments_dir"], GRID["results_dir"]
RES = GRID["resources"]


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/results.smk"


rule all:
    input:
        rules.aggregate.output,
    default_target: True
