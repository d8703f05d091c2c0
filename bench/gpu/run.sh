#!/bin/bash
# GPU calls B, C, ...: run the benchmark plan (bench/gpu/driver.py) for at most BUDGET seconds, resuming where the
# previous call stopped. Call B carries .vw2 (vLLM's kernels); later calls carry nothing while the machine stays warm
# (the vLLM servers started by call B run on in their own sessions; results accumulate in /root/gpubench).
#   BUDGET=560 LAYOUT=x2 bash bench/gpu/run.sh            (on the GPU machine, from the repository root)
#   MODE=sim bash bench/gpu/run.sh                         (anywhere: the same plan against `capbalancer sim` instances)
# Results: $OUT/res.tar.gz (every JSON, log and measured profile so far, rewritten after each job) and $OUT/summary.md.
R=$(pwd); OUT=${OUT:-$R/out/gpu}; mkdir -p $OUT
# A frozen copy of capbalancer (bench/gpu/snapshot.sh, carried as .vwcb) keeps other people's edits in progress out
# of a run; without one the working tree's capbalancer is used.
CB=$R; [ -d $R/.vwcb/capbalancer ] && CB=$R/.vwcb && echo "capbalancer from .vwcb: $(cat $R/.vwcb/COMMIT)"
MODE=${MODE:-vllm}; LAYOUT=${LAYOUT:-x2}; BUDGET=${BUDGET:-560}
export SITE=${SITE:-/root/site}
if [ "$MODE" = vllm ]; then
  if [ ! -f $SITE/vllm/__init__.py ]; then echo "FRESH MACHINE: run bench/gpu/install.sh first (call A)"; exit 3; fi
  if [ ! -f $SITE/vllm/_C_stable_libtorch.abi3.so ]; then
    xz -dc .vw2/_C_stable_libtorch.abi3.so.xz > $SITE/vllm/_C_stable_libtorch.abi3.so.tmp && \
      mv $SITE/vllm/_C_stable_libtorch.abi3.so.tmp $SITE/vllm/_C_stable_libtorch.abi3.so || { echo "no .vw2 carried?"; exit 4; }
  fi
  export CB_PYTHONPATH=$CB:/root/cbsite WORK=${WORK:-/root/gpubench}
else
  export CB_PYTHONPATH=$CB WORK=${WORK:-$R/out/gpubench-sim}
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY bench/gpu/driver.py --mode $MODE --layout $LAYOUT --budget $BUDGET --work $WORK --out $OUT $DRIVER_ARGS 2>&1 | tee -a $OUT/driver.log
