"""Write a randomly initialized model as a Hugging Face directory, with our own code only.

    python scripts/make_tiny_model.py --out /tmp/bench_tiny

The default is the benchmark model: Qwen2, hidden 256, MLP 768, 4 layers, 4 heads, 2 KV heads,
vocabulary 128, tied embeddings, q/k/v biases, float32 (3.2M parameters), with the character
tokenizer of the synthetic tasks. Other shapes come from the flags, e.g. Qwen2.5-0.5B's:

    python scripts/make_tiny_model.py --out /tmp/q05b --hidden 896 --mlp 4864 --layers 24 \
        --heads 14 --kv-heads 2 --vocab 151936 --dtype bfloat16

No torch is involved: `grpo_jax.model.init_params` builds the weights and `grpo_jax.hf_io.save`
writes config.json, model.safetensors and the tokenizer files.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from grpo_jax import hf_io, model
from grpo_jax.config import SUPPORTED_ARCHS, ModelConfig
from grpo_jax.tasks.tokenizers import char_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="directory to write (created if missing)")
    ap.add_argument("--arch", default="qwen2", choices=SUPPORTED_ARCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=768, help="intermediate (MLP) width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None, help="default: hidden // heads")
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--untie", action="store_true", help="separate lm_head (default: tied)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return ap.parse_args(argv)


def build_config(a: argparse.Namespace) -> ModelConfig:
    # Biases follow the architecture: Qwen2 has q/k/v biases; Qwen3 and Llama here have none.
    # (Qwen3 models are recognized by their q/k RMSNorm.)
    return ModelConfig(arch=a.arch, vocab_size=a.vocab, hidden_size=a.hidden,
                       intermediate_size=a.mlp, num_layers=a.layers, num_heads=a.heads,
                       num_kv_heads=a.kv_heads, head_dim=a.head_dim,
                       tie_word_embeddings=not a.untie, attention_bias=a.arch == "qwen2",
                       qk_norm=a.arch == "qwen3", param_dtype=a.dtype, compute_dtype=a.dtype)


def main(argv=None) -> None:
    a = parse_args(argv)
    tok = char_tokenizer()
    if a.vocab < len(tok):
        sys.exit(f"--vocab {a.vocab} is smaller than the character tokenizer ({len(tok)} tokens)")
    cfg = build_config(a)
    t0 = time.perf_counter()
    params = model.init_params(cfg, jax.random.key(a.seed))
    out = hf_io.save(params, cfg, a.out, tokenizer=tok)
    print(f"wrote {out}: {cfg.arch}, {cfg.num_params:,} params ({cfg.num_params / 1e6:.1f}M), "
          f"hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads (head_dim {cfg.hd}), "
          f"vocab {cfg.vocab_size}, tied={cfg.tie_word_embeddings}, {cfg.param_dtype} "
          f"({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
