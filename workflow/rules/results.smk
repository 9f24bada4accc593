# Tables, figures and the health list from every run's metrics.json (kdlab results).


localrules:
    aggregate,


rule aggregate:
    input:
        [out for job in JOBS.values() if job.rule != "pretrain_paraphraser" for out in job.outputs[:1]],
    output:
        table_csv=RESULTS + "/results.csv",
        table_md=report(RESULTS + "/results.md", category="Results table"),
        health=report(RESULTS + "/health.md", category="Health"),
        health_json=RESULTS + "/health.json",
        accuracy_vs_alpha=report(RESULTS + "/accuracy_vs_alpha.png", category="Figures"),
        methods_at_best_alpha=report(RESULTS + "/methods_at_best_alpha.png", category="Figures"),
    log:
        "logs/aggregate.log",
    shell:
        "kdlab results {EXP:q} --out {RESULTS:q} --method-versions {VERSIONS} > {log:q} 2>&1"
