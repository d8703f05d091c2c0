"""Build a tiny random-weight Llama with a locally trained byte-level BPE tokenizer (no hub access).

Two halves:
- `ensure_model()` runs in the project's interpreter: it computes a content hash of this file and the model
  settings, and, if no model with that hash is cached, runs this file as a script under the vLLM venv's
  python (which has torch, transformers and tokenizers) to build it.
- `python make_model.py --out DIR` (vLLM venv) does the building: trains the tokenizer on local text, saves
  a seeded random Llama in safetensors with a chat template. It takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Small enough to load in seconds and run fast on one CPU core; 4096 tokens of vocabulary keep the
# tokenizer realistic (roughly 4 characters a token on English text).
MODEL_SETTINGS: dict[str, int] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seed": 1234,
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CACHE = Path.home() / ".cache" / "capbalancer" / "models"


def model_key() -> str:
    """Hash of everything that decides the model's bytes: this builder's source and the Python version
    (the tokenizer is trained on the standard library's own source files)."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps(MODEL_SETTINGS, sort_keys=True).encode())
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()[:16]


def ensure_model(vllm_python: Path, cache_root: Path | None = None) -> Path:
    """Return the directory of the cached tiny model, building it with vllm_python if needed."""
    cache_root = cache_root or Path(os.environ.get("CAPBALANCER_MODEL_CACHE", str(DEFAULT_CACHE)))
    target = cache_root / f"tiny-llama-{model_key()}"
    if (target / ".complete").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model that looks cached.
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root))
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "HF_HOME": str(work / "hf")}
        proc = subprocess.run([str(vllm_python), __file__, "--out", str(work / "model")], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building the tiny model failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        (work / "model" / ".complete").write_text(model_key() + "\n")
        if not (target / ".complete").is_file():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# Common short English words. Real LLM tokenizers encode each as one token with its leading space, and the
# load tester's synthetic prompts (capbalancer/loadtest/workloads.py) and the simulator count on that (one
# word = one token = 4 characters). Trained on code alone, the tokenizer split them and a "150-token"
# prompt was ~250 tokens on the real server: real and simulated runs then did different work.
ENGLISH_WORDS = (
    "the and for are but not you all any can had her was one our out day get has him his how man new now "
    "old see two way who boy did its let put say she too use act add age ago air arm art ask bad bag bed "
    "big bit box bus buy car cat cup cut dog dry ear eat egg end eye far few fit fly fun gas god gun guy "
    "hat hit hot ice job key kid lay leg lie lot low map may mix net nor oil own pay per pop red row run "
    "sea set sit six sky son sun tax tea ten tie top toy try war wet win yes yet "
    "word over then jumps quick brown fox lazy hello say this that with from have they will what when "
    "about which their there would other into more some time could these two first"
).split()


def _corpus_files(work: Path) -> list[str]:
    """Local text to train the tokenizer on: the standard library's source (prose in docstrings and code),
    plus a seeded stream of common English words."""
    import random
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "textwrap.py", "difflib.py", "pydoc.py", "inspect.py", "typing.py",
             "dataclasses.py", "json/__init__.py", "email/message.py", "http/client.py", "random.py"]
    rng = random.Random(0)
    english = work / "english.txt"
    english.write_text("\n".join(" ".join(rng.choice(ENGLISH_WORDS) for _ in range(40)) for _ in range(3000)))
    return [str(stdlib / n) for n in names if (stdlib / n).is_file()] + [str(english)]


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    settings = dict(MODEL_SETTINGS)
    seed = settings.pop("seed")
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=settings["vocab_size"], special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with tempfile.TemporaryDirectory() as corpus_dir:
        tok.train(_corpus_files(Path(corpus_dir)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = settings["max_position_embeddings"]
    fast.save_pretrained(str(out))

    torch.manual_seed(seed)
    config = LlamaConfig(**settings, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build the tiny model (run under the vLLM venv)")
    parser.add_argument("--out", type=Path, required=True)
    build(parser.parse_args().out)
