#!/usr/bin/env bash
# Runs the trainer benchmark (bench_train.py, sized for an H100/H200 with --gpu, a few minutes)
# on a CUDA machine whose python3 already has torch, numpy, tqdm and safetensors. Nothing is
# downloaded: this checkout is installed without its dependencies into a scratch folder put on
# PYTHONPATH, so the machine's Python environment is left as it is.
#
#   bash benchmarks/gpu_run.sh                           # report in ./bench_train_gpu.txt
#   OUT=/some/dir bash benchmarks/gpu_run.sh             # report in /some/dir
#   bash benchmarks/gpu_run.sh --sections ce --repeats 2 # extra options go to bench_train.py
#
# Environment: OUT (report folder, default .), VITSCOPE_SITE (scratch install folder, default
# /tmp/vitscope-site).
set -euo pipefail
mkdir -p "${OUT:-.}"
OUT="$(cd "${OUT:-.}" && pwd)"  # relative to where the script was started, not to the checkout
SITE="${VITSCOPE_SITE:-/tmp/vitscope-site}"
cd "$(dirname "$0")/.."

python3 -c "import numpy, safetensors, torch, tqdm" || {
    echo "python3 needs torch, numpy, tqdm and safetensors installed" >&2
    exit 1
}

rm -rf "$SITE"
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" .; then
    # e.g. a setuptools too old to build a wheel: copy the packages as pyproject.toml maps them
    echo "pip could not install this checkout; copying its packages into $SITE instead" >&2
    rm -rf "$SITE"
    mkdir -p "$SITE"
    cp -r vitscope "$SITE/vitscope"
    for stage in extractor trainer analyzer explorer; do
        cp -r "services/$stage" "$SITE/vitscope/$stage"
    done
    cp -r proto "$SITE/vitscope/protos"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi -L || true
python3 -c "import platform, torch; print(f'python {platform.python_version()}, torch {torch.__version__} \
(CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads')"
python3 benchmarks/bench_train.py --gpu "$@" 2>&1 | tee "$OUT/bench_train_gpu.txt"
