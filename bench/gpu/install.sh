#!/bin/bash
# GPU call A (about 2 minutes): install vLLM 0.26.0 + deps from the carried archives into /root/site,
# capbalancer's missing dependency (orjson) into /root/cbsite, make random bf16 weights for the
# Llama-3.1-8B-shaped model (vocab 4096) into /root/m8b, precompile the Python trees.
# Run from the repository root on the GPU machine, carrying .vw1 (see bench/gpu/prepare.sh):
#   bash bench/gpu/install.sh
# /root survives only while the machine stays warm (30 s after a call): start call B (bench/gpu/run.sh) at once.
R=$(pwd); T0=$(date +%s); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /root/vw /root/site /root/cbsite /root/logs
exec > >(tee $OUT/install.log) 2>&1
echo "== install $(date -u)"; nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
python3 -V; nproc; free -g | head -2
for p in aiohttp uvloop numpy yaml prometheus_client click tqdm orjson; do python3 -c "import $p; print('have $p', getattr($p,'__version__',''))" 2>&1 | tail -1; done
# capbalancer's dependencies missing from the GPU image (orjson, httptools): wheels from prepare.sh (.vw1) or .whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/cbsite \
  $(ls .vw1/*.whl .whl/*.whl 2>/dev/null) && echo "wheels -> /root/cbsite: $(ls /root/cbsite | grep -c dist-info)"
cd /root/site
# wait on the jobs' own PIDs: a bare `wait` would also wait for the `tee` of the exec line above, forever
# (that hang cost a whole 400 s call on 2026-11-21)
if command -v xz >/dev/null; then (xz -dc $R/.vw1/deps.tar.xz | tar xf -) & P1=$!; (xz -dc $R/.vw1/vllm_py.tar.xz | tar xf -) & P2=$!; wait $P1 $P2
else python3 -c "import tarfile,sys; [tarfile.open(f).extractall('.') for f in sys.argv[1:]]" $R/.vw1/deps.tar.xz $R/.vw1/vllm_py.tar.xz; fi
echo "extract t=$(( $(date +%s)-T0 ))s"; du -sh /root/site; cd "$R"
mkdir -p /root/m8b && cp bench/gpu/recipe/m8b_meta/* /root/m8b/
# WEIGHTS=dummy: no weight files; start the servers with --vllm-extra=--load-format=dummy (what the 2026-11-21 run did)
if [ "${WEIGHTS:-random}" != dummy ]; then
  ( timeout 300 python3 bench/gpu/recipe/gen_weights.py /root/m8b; echo "weights rc=$? t=$(( $(date +%s)-T0 ))s" ) & P3=$!
fi
# .pyc for vLLM's tree and deps: each server start imports it (about 25 s of its start is Python imports)
( python3 -m compileall -q -j 16 /root/site >/dev/null 2>&1; echo "compileall rc=$? t=$(( $(date +%s)-T0 ))s" ) & P4=$!
wait $P3 $P4
PYTHONPATH=$R:/root/cbsite python3 -c "import capbalancer, orjson, httptools; import capbalancer.server.app; print('capbalancer', capbalancer.__version__, 'orjson', orjson.__version__, 'httptools', httptools.__version__)"
PYTHONPATH=/root/site timeout 120 python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'gpus', torch.cuda.device_count())"
ls -la /root/m8b | head -20; df -h /root | tail -1
echo "install done in $(( $(date +%s)-T0 ))s"
