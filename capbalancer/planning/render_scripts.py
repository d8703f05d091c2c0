"""Per-machine launch scripts (bash) for vLLM or TGI, from deploy/templates/machine.sh.tmpl.

Every engine flag the plan depends on is pinned, because the engines' defaults differ across GPUs
(vLLM picks max_num_seqs / max_num_batched_tokens by GPU memory and name).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from string import Template

from capbalancer.planning.plan import PlanFile, PlannedInstance
from capbalancer.planning.render_common import DEPLOY_DIR
from capbalancer.profiling.specs import load_specs

TEMPLATE_PATH = DEPLOY_DIR / "templates" / "machine.sh.tmpl"


def vllm_args(inst: PlannedInstance, model: str, model_ref: str, host: str = "0.0.0.0") -> list[str]:
    p = inst.profile
    args = ["vllm", "serve", model_ref, "--served-model-name", model, "--host", host, "--port", str(inst.port),
            "--tensor-parallel-size", str(inst.tp), "--gpu-memory-utilization", f"{p.gpu_memory_utilization:g}",
            "--max-num-seqs", str(p.max_num_seqs), "--max-num-batched-tokens", str(p.max_num_batched_tokens),
            "--max-model-len", str(p.max_model_len), "--block-size", str(p.block_size)]
    if not load_specs().gpu(inst.gpu).supports_bf16:
        args += ["--dtype", "half"]  # P100/V100 have no bf16
    return args


def tgi_args(inst: PlannedInstance, model: str, model_ref: str, host: str = "0.0.0.0") -> list[str]:
    p = inst.profile
    args = ["text-generation-launcher", "--model-id", model_ref, "--hostname", host, "--port", str(inst.port),
            "--num-shard", str(inst.tp), "--cuda-memory-fraction", f"{p.gpu_memory_utilization:g}",
            # The plan's KV capacity is TGI's token budget for a batch; TGI refuses to start if it is too big.
            "--max-batch-total-tokens", str(p.kv_capacity_tokens),
            "--max-concurrent-requests", str(p.max_num_seqs), "--max-batch-size", str(p.max_num_seqs),
            "--max-total-tokens", str(p.max_model_len), "--max-input-tokens", str(p.max_model_len - 1),
            "--max-batch-prefill-tokens", str(max(p.max_num_batched_tokens, p.max_model_len))]
    if not load_specs().gpu(inst.gpu).supports_bf16:
        args += ["--dtype", "float16"]
    return args


def launch_command(inst: PlannedInstance, engine: str, model: str) -> str:
    """The shell line that starts one instance (MODEL is expanded by the script)."""
    builder = vllm_args if engine == "vllm" else tgi_args
    words = builder(inst, model, "__MODEL__")
    line = " ".join('"$MODEL"' if w == "__MODEL__" else shlex.quote(w) for w in words)
    devices = ",".join(str(g) for g in inst.gpu_ids)
    return f"CUDA_VISIBLE_DEVICES={devices} setsid {line}"


def render_machine_script(plan: PlanFile, machine: dict, engine: str, model_path: str) -> str:
    instances = [i for i in plan.instances if i.machine == machine["name"]]
    starts, stops, statuses = [], [], []
    for inst in instances:
        name = shlex.quote(inst.name)
        url = f"http://127.0.0.1:{inst.port}"
        starts.append(f"  # {inst.name}: TP{inst.tp} on GPUs {','.join(map(str, inst.gpu_ids))}, "
                      f"{inst.profile.kv_capacity_tokens:,} KV tokens ({inst.profile.source}), predicted "
                      f"{inst.predicted_output_tokens_per_second:,.0f} tok/s at batch {inst.predicted_batch}")
        starts.append(f"  {launch_command(inst, engine, plan.model)} > \"$LOG_DIR/{inst.name}.log\" 2>&1 &")
        starts.append(f"  echo $! > \"$LOG_DIR/{inst.name}.pid\"")
        starts.append(f"  wait_health {url} {name} \"$(cat \"$LOG_DIR/{inst.name}.pid\")\"")
        stops.append(f"  stop_instance {name}")
        statuses.append(f"  if curl -fsS -o /dev/null {url}/health; then echo \"{inst.name} up\"; "
                        f"else echo \"{inst.name} down\"; fi")
    empty = "  :"
    script = f"machine-{machine['name']}.sh"
    return Template(TEMPLATE_PATH.read_text()).substitute(
        plan=plan.source, machine=machine["name"], gpu_count=machine["count"], gpu=machine["gpu"],
        address=machine.get("address", "127.0.0.1"), engine=engine, script=script,
        predicted=f"{machine.get('predicted_output_tokens_per_second', 0):,.0f}",
        model_path=model_path, starts="\n".join(starts) or empty, stops="\n".join(stops) or empty,
        statuses="\n".join(statuses) or empty)


def write_scripts(plan: PlanFile, out_dir: Path, engine: str, model_path: str | None = None) -> list[Path]:
    if engine not in ("vllm", "tgi"):
        raise ValueError(f"launch scripts are for vllm or tgi, not {engine!r} (use --target local for sim)")
    model_ref = model_path or load_specs().model(plan.model).hf_id
    written = []
    for machine in plan.machines:
        if not machine.get("instances"):
            continue
        path = out_dir / "scripts" / f"machine-{machine['name']}.sh"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_machine_script(plan, machine, engine, model_ref))
        path.chmod(0o755)
        written.append(path)
    return written
