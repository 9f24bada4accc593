"""``kdlab results``: tables, figures and a health list from an experiments directory.

Reads only the JSON files of the run-directory contract (``docs/run-files.md``):
``metrics.json`` marks a complete run, ``progress.json`` a running, finishing or
failed one. It never imports torch (the method registry is read from its source,
``registry.py``), so it runs anywhere (login node, cron, PBS).

The package, in the order the command uses it:

* ``runs``       finding runs, summarising each run file, marking misplaced and
  duplicate ones;
* ``registry``   the registered methods and their versions, without importing them;
* ``published``  published numbers (``published.json``, with their sources) and which
  runs match their dataset, pair and recipe;
* ``table``      the table (CSV, Markdown summary with a column per registered method,
  the comparison with published numbers);
* ``health``     the health list;
* ``figures``    aggregate figures and per-run curves;
* ``command``    ``run_results``, its cache and the argparse entry point.

Outputs, all written atomically into ``--out``: ``results.csv`` / ``results.md``,
``health.json`` / ``health.md``, ``accuracy_vs_alpha.png``, ``methods_at_best_alpha.png``,
``curves/*.png`` and the cache ``.results-state.json`` (docs/results.md).
"""

from .command import (CURVES_DIR, FIG_ALPHA, FIG_BEST, HEALTH_JSON, HEALTH_MD, OUTPUT_FILES,
                      STATE_NAME, TABLE_CSV, TABLE_MD, _default_jobs, add_parser, main,
                      parse_method_versions, run_results)
from .figures import curve_name
from .health import build_health, health_markdown, is_near_chance, outdated_version
from .published import load_sources
from .registry import registry_versions
from .runs import load_runs, parse_run_path, scan_runs, summarize
from .table import CSV_COLUMNS, build_table, mean_std, table_csv, table_markdown

__all__ = [
    "CSV_COLUMNS", "CURVES_DIR", "FIG_ALPHA", "FIG_BEST", "HEALTH_JSON", "HEALTH_MD",
    "OUTPUT_FILES", "STATE_NAME", "TABLE_CSV", "TABLE_MD", "_default_jobs", "add_parser",
    "build_health", "build_table", "curve_name", "health_markdown", "is_near_chance",
    "load_runs", "load_sources", "main", "mean_std", "outdated_version",
    "parse_method_versions", "parse_run_path", "registry_versions", "run_results",
    "scan_runs", "summarize", "table_csv", "table_markdown",
]
