#!/bin/bash
# On the CPU machine: the peers' prefix routers as wheels for the GPU machine (it cannot download), into .vwp/
# (ignored by /.vw*/; 54 MB, carried by the call that runs the peer jobs: bench/gpu/peers_install.sh there).
#   bench/gpu/peers_prepare.sh
set -e
R=$(cd "$(dirname "$0")/../.." && pwd); cd "$R"
rm -rf .vwp && mkdir -p .vwp
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .vwp \
  vllm-router==0.1.17 sglang-router==0.3.2
du -sh .vwp; ls -la .vwp
