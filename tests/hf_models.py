"""Tiny random-init Hugging Face models made locally (no downloads), for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ARCH_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                "llama": ("LlamaConfig", "LlamaForCausalLM")}


def hf_config(arch: str, **overrides):
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return getattr(transformers, ARCH_CLASSES[arch][0])(**kw)


def make_hf_model(path: Path, arch: str = "qwen2", seed: int = 0, with_tokenizer: bool = True,
                  **overrides):
    """Random-init a tiny `transformers` model, save it to `path`, return the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = getattr(transformers, ARCH_CLASSES[arch][1])(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb them so parity tests see them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if with_tokenizer:
        char_tokenizer(cfg.vocab_size).save_pretrained(path)
    return model


def char_tokenizer(vocab_size: int = 128):
    from grpo_jax.tasks.tokenizers import char_tokenizer as make

    tok = make()
    assert len(tok) <= vocab_size, (len(tok), vocab_size)
    return tok


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()
