#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_run.sh installs on the GPU machine, which has
# torch 2.11 and transformers 5.17 but not the project's pinned transformers nor the service's
# web dependencies (and py-spy, for bench/server_gil.sh). Versions: those of the dev environment.
# Needs the package registry.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  transformers==5.24.0 regex==2026.11.19 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 \
  websockets==15.0.1 orjson==3.13.0 pydantic==2.14.4 pydantic_core==2.50.5 python-multipart==0.0.34 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 pybase64==1.5.1 py-spy==0.4.3
du -sh .whl
