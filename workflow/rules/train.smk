# Training rules. Declared outputs are only completion files; checkpoint.pth is never
# an output, so a killed or failed job keeps its progress and the next attempt resumes.


rule train_teacher:
    output:
        metrics=f"{TEACHER}/metrics.json",
        model=f"{TEACHER}/model.pth",
    wildcard_constraints:
        teacher=TRAINED_TEACHERS,
    params:
        run=run_param(f"{TEACHER}/metrics.json"),
        method_version=METHODS["none"].VERSION,
    log:
        f"{LOGS}/train_teacher/{{dataset}}/{{teacher}}/{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train_teacher/{{dataset}}/{{teacher}}/{{seed}}.tsv"
    threads: RES["threads"]
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("train_teacher"),
    shell:
        "kdlab train --config {params.run:q} --runtime \"$KDLAB_RUNTIME_TEACHER\" --threads {threads} --run-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"


rule import_teacher:
    input:
        lambda w: job(f"{TEACHER}/metrics.json")(w).inputs,
    output:
        metrics=f"{TEACHER}/metrics.json",
        model=f"{TEACHER}/model.pth",
    wildcard_constraints:
        teacher=IMPORTED_TEACHERS,
    params:
        run=run_param(f"{TEACHER}/metrics.json"),
    log:
        f"{LOGS}/import_teacher/{{dataset}}/{{teacher}}/{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/import_teacher/{{dataset}}/{{teacher}}/{{seed}}.tsv"
    threads: RES["threads"]
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("import_teacher"),
    shell:
        "kdlab import-teacher --config {params.run:q} --runtime \"$KDLAB_RUNTIME_TEACHER\" --threads {threads} --run-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"


rule pretrain_paraphraser:
    input:
        lambda w: job(PARAPHRASER)(w).inputs,
    output:
        PARAPHRASER,
    params:
        run=run_param(PARAPHRASER),
        method_version=METHODS["ft"].VERSION,
    log:
        f"{LOGS}/pretrain_paraphraser/{{dataset}}/{{teacher}}/{{seed}}/{{setting}}.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain_paraphraser/{{dataset}}/{{teacher}}/{{seed}}/{{setting}}.tsv"
    threads: RES["threads"]
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("pretrain_paraphraser"),
    shell:
        "kdlab pretrain-paraphraser --config {params.run:q} --runtime \"$KDLAB_RUNTIME_STUDENT\" --threads {threads} --out {output:q} > {log:q} 2>&1"


TEACHER_CACHE = f"{TEACHER}/{teacher_cache.FILE_NAME}"  # where kdlab/grid.py expects it


rule cache_teacher:
    # The teacher's outputs for every view of every training image (kdlab/teacher_cache.py),
    # an input of the distill jobs that read it (grid.py decides which).
    input:
        lambda w: job(TEACHER_CACHE)(w).inputs,
    output:
        TEACHER_CACHE,
    params:
        run=run_param(TEACHER_CACHE),
    log:
        f"{LOGS}/cache_teacher/{{dataset}}/{{teacher}}/{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/cache_teacher/{{dataset}}/{{teacher}}/{{seed}}.tsv"
    threads: RES["threads"]
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("cache_teacher"),
    shell:
        "kdlab cache-teacher --config {params.run:q} --runtime \"$KDLAB_RUNTIME_STUDENT\" --threads {threads} --weights {input:q} --out {output:q} > {log:q} 2>&1"


rule train_student:
    output:
        metrics=f"{STUDENT}/metrics.json",
        model=f"{STUDENT}/model.pth",
    params:
        run=run_param(f"{STUDENT}/metrics.json"),
        method_version=METHODS["none"].VERSION,
    log:
        f"{LOGS}/train_student/{{dataset}}/{{student}}/{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train_student/{{dataset}}/{{student}}/{{seed}}.tsv"
    threads: RES["threads"]
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("train_student"),
    shell:
        "kdlab train --config {params.run:q} --runtime \"$KDLAB_RUNTIME_STUDENT\" --threads {threads} --run-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"


rule distill:
    input:
        lambda w: job(f"{DISTILL}/metrics.json")(w).inputs,
    output:
        metrics=f"{DISTILL}/metrics.json",
        model=f"{DISTILL}/model.pth",
    params:
        run=run_param(f"{DISTILL}/metrics.json"),
        # The method's loss version: bumping it in the code makes `snakemake -n` list exactly
        # that method's runs ("Params have changed"), and the params trigger rerun them.
        method_version=lambda w: METHODS[w.method].VERSION,
    log:
        f"{LOGS}/distill/{{dataset}}/{{method}}/{{recipe}}/{{teacher}}_to_{{student}}/{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/distill/{{dataset}}/{{method}}/{{recipe}}/{{teacher}}_to_{{student}}/{{seed}}.tsv"
    threads: RES["threads"]
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        gpu=RES["gpu"],
        gpu_share=RES["gpu_share"],
        runtime=runtime_minutes("distill"),
    shell:
        "kdlab train --config {params.run:q} --runtime \"$KDLAB_RUNTIME_STUDENT\" --threads {threads} --run-dir \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"
