#!/bin/bash
# On the CPU machine (no GPU needed), from the repository root: builds what the GPU machine cannot download.
#   bench/gpu/prepare.sh [WORKDIR]      (default .vwbuild; about 8 minutes, mostly xz -9e)
# Leaves, in ignored folders of the checkout (.gitignore has /.vw*/):
#   .vw1/  deps.tar.xz (vLLM's pure-Python and small compiled deps), vllm_py.tar.xz (trimmed vLLM 0.26.0 tree),
#          orjson-*.whl, httptools-*.whl (capbalancer's dependencies missing from the GPU image)  -> carried by call A
#   .vw2/  _C_stable_libtorch.abi3.so.xz (vLLM's kernels, 55.8 MB)                          -> carried by call B
# Each call carries at most 64 MiB, which is why the archives are split in two.
set -e
R=$(cd "$(dirname "$0")/../.." && pwd); cd "$R"
W=${1:-.vwbuild}
if [ ! -f "$W/pack/_C_stable_libtorch.abi3.so.xz" ]; then bash bench/gpu/recipe/prepare.sh "$W"; fi
mkdir -p .vw1 .vw2
cp "$W/pack/deps.tar.xz" "$W/pack/vllm_py.tar.xz" .vw1/
cp "$W/pack/_C_stable_libtorch.abi3.so.xz" .vw2/
rm -f .vw1/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .vw1 \
  orjson==3.13.0 httptools==0.9.0
du -sh .vw1 .vw2; ls -la .vw1 .vw2
