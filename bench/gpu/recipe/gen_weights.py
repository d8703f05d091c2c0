"""Random bf16 weights for a Llama-3.1-8B-shaped model (shapes from config.json), generated on the GPU and saved
shard by shard as safetensors (from ../shared/gpu-vllm/gen_weights.py, reformatted).

    python3 gen_weights.py MODEL_DIR        (MODEL_DIR holds config.json; about 16 s and 14 GB on an H100)
"""

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

out = sys.argv[1]
c = json.load(open(os.path.join(out, "config.json")))
H, INTER, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
hd = c.get("head_dim") or H // nh
torch.manual_seed(0)
t0 = time.time()


def rnd(*s):
    return torch.empty(s, dtype=torch.bfloat16, device="cuda").normal_(0.0, 0.02).cpu()


def ones(n):
    return torch.ones(n, dtype=torch.bfloat16)


def layer(i):
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
            p + "self_attn.q_proj.weight": rnd(nh * hd, H), p + "self_attn.k_proj.weight": rnd(nkv * hd, H),
            p + "self_attn.v_proj.weight": rnd(nkv * hd, H), p + "self_attn.o_proj.weight": rnd(H, nh * hd),
            p + "mlp.gate_proj.weight": rnd(INTER, H), p + "mlp.up_proj.weight": rnd(INTER, H),
            p + "mlp.down_proj.weight": rnd(H, INTER)}


per = 4
groups = [None] + [list(range(s, min(L, s + per))) for s in range(0, L, per)]
n = len(groups)
wmap = {}
total = 0
for k, g in enumerate(groups):
    if g is None:
        d = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": ones(H), "lm_head.weight": rnd(V, H)}
    else:
        d = {}
        for i in g:
            d.update(layer(i))
    fn = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    save_file(d, os.path.join(out, fn), metadata={"format": "pt"})
    for name, t in d.items():
        wmap[name] = fn
        total += t.numel() * t.element_size()
    del d
json.dump({"metadata": {"total_size": total}, "weight_map": wmap},
          open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=1)
print(f"wrote {n} shards, {total / 1e9:.2f} GB, params {total / 2 / 1e9:.3f} B, in {time.time() - t0:.1f}s", flush=True)
