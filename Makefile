# Everything runs inside .venv, created and filled from pyproject.toml when missing.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
SNAKEMAKE := snakemake --cores all

.PHONY: install test demo report dag bench clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(SNAKEMAKE) --configfile config/demo.yaml

report: $(STAMP)
	$(SNAKEMAKE) --configfile config/demo.yaml --report report.html

# The job DAG and the rule graph as SVG (graphviz's dot; installed with apt-get when missing and possible).
dag: $(STAMP)
	command -v dot >/dev/null || (apt-get update -qq && apt-get install -y -qq graphviz) || \
	  (echo "graphviz (dot) is missing; install it, or use: snakemake --dag mermaid-js" && false)
	mkdir -p dag
	$(SNAKEMAKE) --configfile $(or $(CONFIG),config/demo.yaml) --dag | dot -Tsvg > dag/jobs.svg
	$(SNAKEMAKE) --configfile $(or $(CONFIG),config/demo.yaml) --rulegraph | dot -Tsvg > dag/rules.svg
	@echo "wrote dag/jobs.svg and dag/rules.svg"

bench: $(STAMP)
	$(PY) bench/bench_results.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_classic.py
	$(PY) bench/bench_io.py config/config.yaml config/crd.yaml

# Only the demo's own files (its dataset is Synthetic): a grid in the same checkout keeps its runs,
# logs, logs/pbs/jobs.tsv and Snakemake's records in .snakemake/.
clean-demo:
	rm -rf experiments/Synthetic results/curves/Synthetic__* logs/*/Synthetic logs/benchmarks/*/Synthetic
