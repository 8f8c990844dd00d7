#!/bin/bash
# On this (CPU) machine, from the project root: fill .device/ for the GPU machine (no network there).
# ../shared/gpu/pack.sh brings the data tarball and the fastai wheels; this adds the wheels of the
# project's own dependencies that the GPU machine's Python 3.12 lacks (typer and its helpers,
# safetensors, imagehash + PyWavelets). Then carry `.device` with `run`.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/gpu/pack.sh
pip=${PIP:-.venv/bin/pip}
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .device/wheels typer==0.29.2 click==8.5.1 rich==15.0.0 shellingham==1.5.4 markdown-it-py==4.3.0 \
    mdurl==0.1.2 pygments==2.21.0 safetensors==0.8.0 imagehash==4.3.2 pywavelets==1.9.0
du -sh .device
