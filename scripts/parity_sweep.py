"""Logit parity with `transformers` over random model configurations (beyond the test suite's).

    python scripts/parity_sweep.py --configs 30 --seed 0            # all architectures
    python scripts/parity_sweep.py --configs 20 --rope yarn         # every config with YaRN

Each configuration draws an architecture (qwen2 / qwen3 / llama), head counts (MHA, GQA, MQA),
head_dim, hidden and MLP sizes, layers, RoPE theta and scaling (none, llama3, linear, yarn with
its options), tied or untied embeddings, attention biases and the RMSNorm epsilon. A random-init
model is saved with `save_pretrained` (norms and biases perturbed so that they matter), loaded
through `hf_io.load`, and both compute float32 logits on left-padded batches. Configurations
that `transformers` itself refuses (e.g. a hidden size Llama requires to split evenly) are
skipped and counted. Prints one line per configuration and a JSON summary last; exits 1 if any
configuration differs by more than --atol. Needs torch (`pip install torch==2.13.0`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/hf_models.py


def draw(rng: random.Random, rope: str) -> tuple[str, dict]:
    arch = rng.choice(["qwen2", "qwen3", "llama"])
    kv, groups, hd = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 4]), rng.choice([8, 16, 24, 32, 64])
    heads = kv * groups
    ov = dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
              hidden_size=rng.choice([heads * hd, 48, 96, 128, 160]),
              intermediate_size=rng.choice([32, 100, 200, 256]),
              num_hidden_layers=rng.choice([1, 2, 3]),
              rope_theta=rng.choice([100.0, 10000.0, 5e5, 1e6]),
              tie_word_embeddings=rng.random() < 0.5, rms_norm_eps=rng.choice([1e-6, 1e-5]),
              vocab_size=rng.choice([128, 151, 200]))
    kind = rope if rope != "any" else rng.choice(["none", "none", "llama3", "linear", "yarn"])
    old = rng.choice([16, 64, 8192])  # original context: below, near and above the batch's
    if kind == "llama3":
        ov["rope_scaling"] = {"rope_type": "llama3", "factor": rng.choice([2.0, 8.0, 32.0]),
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": old}
    elif kind == "linear":
        ov["rope_scaling"] = {"rope_type": "linear", "factor": rng.choice([2.0, 4.0])}
    elif kind == "yarn":
        ov["rope_scaling"] = {"rope_type": "yarn", "factor": rng.choice([2.0, 4.0]),
                              "original_max_position_embeddings": old, **rng.choice([
                                  {}, {"beta_fast": 16.0, "beta_slow": 2.0},
                                  {"attention_factor": 1.3}, {"mscale": 1.0, "mscale_all_dim": 0.5},
                                  {"truncate": False}])}
    if arch != "qwen2" and rng.random() < 0.3:
        ov["attention_bias"] = True
    return arch, ov


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rope", choices=["any", "none", "llama3", "linear", "yarn"], default="any")
    ap.add_argument("--atol", type=float, default=1e-4)
    a = ap.parse_args(argv)

    from hf_models import make_hf_model, torch_logits

    from grpo_jax import hf_io
    from grpo_jax import model as M

    rng = random.Random(a.seed)
    worst, bad, refused = 0.0, [], 0
    for i in range(a.configs):
        arch, ov = draw(rng, a.rope)
        with tempfile.TemporaryDirectory() as d:
            try:
                hf = make_hf_model(Path(d), arch, seed=i, initializer_range=0.1, **ov)
            except Exception as e:  # transformers' own config validation
                refused += 1
                print(f"{i:3d} {arch:5s} skipped (transformers refuses it: {str(e).splitlines()[-1][:90]})")
                continue
            cfg, params = hf_io.load(d)
            b, length = 3, rng.choice([7, 20, 33])
            g = np.random.default_rng(i)
            tokens = g.integers(4, ov["vocab_size"], (b, length))
            mask = np.ones((b, length), np.int32)
            mask[1, :3], mask[2, :length // 2] = 0, 0  # left padding
            real = mask.astype(bool)
            err = float(np.abs(np.asarray(M.forward(params, tokens, cfg, mask))[real]
                               - torch_logits(hf, tokens, mask)[real]).max())
        worst = max(worst, err)
        if err > a.atol:
            bad.append(i)
        print(f"{i:3d} {arch:5s} {'ok ' if err <= a.atol else 'BAD'} max |diff| {err:.2e}  {ov}")
    summary = {"configs": a.configs, "compared": a.configs - refused, "refused_by_transformers": refused,
               "failed": bad, "max_abs_diff": worst, "atol": a.atol, "seed": a.seed, "rope": a.rope}
    print(json.dumps(summary))
    return 1 if bad else 0


if __name__ == "__main__":
    import jax

    jax.config.update("jax_platforms", "cpu")  # float32 parity: no TF32 matmuls on a GPU host
    sys.exit(main())
