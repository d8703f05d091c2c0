#!/bin/bash
# On the GPU machine (after install.sh): vllm-router and sglang-router from the carried .vwp/ wheels into
# /root/peers. Their Python needs (fastapi, uvicorn, aiohttp, orjson, setproctitle, requests) come with vLLM in
# /root/site; the driver's peer policies (vllm-router-cache_aware, sglang-router-cache_aware) put both on PYTHONPATH.
set -e
R=$(cd "$(dirname "$0")/../.." && pwd); cd "$R"
[ -d /root/peers/vllm_router ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /root/peers .vwp/*.whl
PYTHONPATH=/root/peers:${SITE:-/root/site}:/root/cbsite python3 -c "import vllm_router_rs, sglang_router; print('peers ok')"
