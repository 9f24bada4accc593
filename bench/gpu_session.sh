#!/bin/bash
# The checks that need a GPU, as one command for a lent GPU machine (the tool library's
# `device`: 15 minutes of device time in all, at most 10 a command). Its image has torch
# (2.11 when last seen), torchvision, numpy, PyYAML, Pillow and pytest, but not jsonschema.
#
#   bench/gpu_session.sh wheels    # here, before: jsonschema and its needs for its Python 3.12, into .whl/
#   (device) run: command "bash bench/gpu_session.sh", carry [".whl"], timeout_s 580
#
# It prints the GPU, then bench_classic.py's figures at full CIFAR-100 size (each line as it
# is measured, so a run cut short keeps what it measured), then tests/test_cuda.py; both logs
# also go to $OUT.
set -o pipefail
WHEELS="attrs==26.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1"
if [ "$1" = wheels ]; then
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 400 python3 bench/bench_classic.py --device cuda --amp bf16 --teacher ResNet110 --student ResNet32 \
    --train-size 50000 --test-size 10000 --workers 8 --epochs 2 2>&1 | tee "$OUT/bench_classic.log"
timeout 150 python3 -m pytest -q -n 0 -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 \
    | tee "$OUT/test_cuda.log"
