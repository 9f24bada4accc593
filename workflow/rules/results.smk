# Tables, figures and the health list from every run's metrics.json (kdlab results).


localrules:
    aggregate,


rule aggregate:
    input:
        [out for job in JOBS.values() if job.rule != "pretrain_paraphraser" for out in job.outputs[:1]],
    output:
        table_csv=f"{RESULTS}/results.csv",
        table_md=report(f"{RESULTS}/results.md", category="Results table"),
        health=report(f"{RESULTS}/health.md", category="Health"),
        health_json=f"{RESULTS}/health.json",
        accuracy_vs_alpha=report(f"{RESULTS}/accuracy_vs_alpha.png", category="Figures"),
        methods_at_best_alpha=report(f"{RESULTS}/methods_at_best_alpha.png", category="Figures"),
    params:
        experiments=lambda w: EXP,
        out=lambda w, output: os.path.dirname(output.table_csv),
        method_versions=json.dumps(method_versions()),
    log:
        f"{LOGS}/aggregate.log",
    conda:
        ENV
    shell:
        "kdlab results {params.experiments:q} --out {params.out:q} --method-versions {params.method_versions:q} > {log:q} 2>&1"
