#!/usr/bin/env bash
# FlashAttention 4 for the GPU machine (server/inference/model/flash.py uses it for the vision
# encoder when it is importable). The machine has no registry and a call carries at most 64 MiB,
# while the package and its CuTe-DSL compiler are ~264 MB unpacked (68 MB as .tar.xz). So: the
# wheels are unpacked here into one folder (fa4site/), packed as .tar.xz and split in two parts,
# .fa4a/ and .fa4b/ (git-ignored). On the device, one call carries .fa4a and copies it to
# /tmp/fa4parts (the machine keeps /tmp while it stays warm, about 30 s between calls); the next
# carries .fa4b, and bench/gpu_run.sh unpacks both into /tmp/fa4site. Needs the package registry.
set -eu
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_17_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$work/wheels" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5
mkdir -p "$work/fa4site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/fa4site"; done
tar -cf - -C "$work" fa4site | xz -9 -T2 >"$work/fa4site.tar.xz"
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
split -b 40M "$work/fa4site.tar.xz" "$work/fa4part."
mv "$work"/fa4part.aa .fa4a/ && mv "$work"/fa4part.a[b-z] .fa4b/
grep -qx '/.fa4a/' .git/info/exclude 2>/dev/null || printf '/.fa4a/\n/.fa4b/\n' >>.git/info/exclude
du -sh .fa4a .fa4b
