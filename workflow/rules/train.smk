# Training rules. Declared outputs are only completion files; checkpoint.pth is never
# an output, so a killed or failed job keeps its progress and the next attempt resumes.


rule train_teacher:
    output:
        metrics=TEACHER + "/metrics.json",
        model=TEACHER + "/model.pth",
    params:
        run=run_param(TEACHER + "/metrics.json"),
        method_version=METHODS["none"].VERSION,
        run_dir=lambda w, output: output.metrics.rsplit("/", 1)[0],
    log:
        "logs/train_teacher/{dataset}/{teacher}/{seed}.log",
    benchmark:
        "logs/benchmarks/train_teacher/{dataset}/{teacher}/{seed}.tsv"
    threads: RES["threads"]
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("train_teacher"),
    shell:
        "kdlab train --config {params.run:q} --runtime {RUNTIME_TEACHER} --threads {threads} --run-dir {params.run_dir:q} > {log:q} 2>&1"


rule pretrain_paraphraser:
    input:
        lambda w: job(PARAPHRASER)(w).inputs,
    output:
        PARAPHRASER,
    params:
        run=run_param(PARAPHRASER),
        method_version=METHODS["ft"].VERSION,
    log:
        "logs/pretrain_paraphraser/{dataset}/{teacher}/{seed}/{setting}.log",
    benchmark:
        "logs/benchmarks/pretrain_paraphraser/{dataset}/{teacher}/{seed}/{setting}.tsv"
    threads: RES["threads"]
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("pretrain_paraphraser"),
    shell:
        "kdlab pretrain-paraphraser --config {params.run:q} --runtime {RUNTIME_STUDENT} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule train_student:
    output:
        metrics=STUDENT + "/metrics.json",
        model=STUDENT + "/model.pth",
    params:
        run=run_param(STUDENT + "/metrics.json"),
        method_version=METHODS["none"].VERSION,
        run_dir=lambda w, output: output.metrics.rsplit("/", 1)[0],
    log:
        "logs/train_student/{dataset}/{student}/{seed}.log",
    benchmark:
        "logs/benchmarks/train_student/{dataset}/{student}/{seed}.tsv"
    threads: RES["threads"]
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("train_student"),
    shell:
        "kdlab train --config {params.run:q} --runtime {RUNTIME_STUDENT} --threads {threads} --run-dir {params.run_dir:q} > {log:q} 2>&1"


rule distill:
    input:
        lambda w: job(DISTILL + "/metrics.json")(w).inputs,
    output:
        metrics=DISTILL + "/metrics.json",
        model=DISTILL + "/model.pth",
    params:
        run=run_param(DISTILL + "/metrics.json"),
        # The method's loss version: bumping it in the code makes `--list-changes params`
        # list exactly that method's runs (and the params trigger rerun them).
        method_version=lambda w: METHODS[w.method].VERSION,
        run_dir=lambda w, output: output.metrics.rsplit("/", 1)[0],
    log:
        "logs/distill/{dataset}/{method}/alpha_{alpha}/{teacher}_to_{student}/{seed}.log",
    benchmark:
        "logs/benchmarks/distill/{dataset}/{method}/alpha_{alpha}/{teacher}_to_{student}/{seed}.tsv"
    threads: RES["threads"]
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("distill"),
    shell:
        "kdlab train --config {params.run:q} --runtime {RUNTIME_STUDENT} --threads {threads} --run-dir {params.run_dir:q} > {log:q} 2>&1"
