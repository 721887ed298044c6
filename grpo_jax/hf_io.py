"""Hugging Face checkpoints <-> our weights pytree, both directions, and faithful tokenizers.

`load(path)` reads `config.json` into a `ModelConfig` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) into weights; tensors are memory-mapped and cast one at a time.
`save(params, cfg, path)` writes a directory that `transformers.AutoModelForCausalLM` loads.
`load_sequence_classifier(path)` reads a `*ForSequenceClassification` checkpoint (reward models):
the same backbone plus its `score` head.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from grpo_jax.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling

# Only numpy here at import time: `load_tokenizer` serves jax-free processes too (the TRL
# benchmark). The weight functions import the model module when called.
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_HF_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some exporters keep


class CheckpointError(ValueError):
    """A Hugging Face directory we cannot read or that does not match the model config."""


# ----------------------------------------------------------------------------- config


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded where a network exists."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(f"{path_or_id}: not a directory. Pass a Hugging Face model directory "
                              "(with config.json and *.safetensors) or a hub id like Qwen/Qwen2.5-0.5B.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id),
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # no network, unknown repo, ...
        raise CheckpointError(f"{path_or_id}: not a local directory and the hub download failed "
                              f"({type(e).__name__}: {e}). Download it elsewhere and pass the "
                              "directory.") from e


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    sc = hf.get("rope_scaling") or params
    kind = sc.get("rope_type", sc.get("type", "default")) if sc else "default"
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear", "yarn"):
        raise CheckpointError(f"rope type {kind!r} is not supported; supported: default, llama3, "
                              "linear, yarn")
    # as `transformers`: a top-level original_max_position_embeddings wins, then the scaling's
    # own, then max_position_embeddings
    names = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
             "attention_factor", "mscale", "mscale_all_dim", "truncate")
    kw = {k: sc[k] for k in names if sc.get(k) is not None}
    old = hf.get("original_max_position_embeddings") or sc.get("original_max_position_embeddings")
    old = old or hf.get("max_position_embeddings")
    if old is not None:
        kw["original_max_position_embeddings"] = int(old)
    if kind == "yarn" and "factor" not in kw:  # implicit: the context's growth
        if old is None:
            raise CheckpointError("rope_scaling yarn: neither factor nor "
                                  "original_max_position_embeddings is given; add the factor")
        kw["factor"] = hf.get("max_position_embeddings", old) / old
    return theta, RopeScaling(kind=kind, **kw)


def config_from_hf(hf: dict, *, param_dtype: str | None = None,
                   compute_dtype: str | None = None) -> ModelConfig:
    """Our `ModelConfig` from a `config.json` dict."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"unsupported architecture model_type={arch!r} "
                              f"({hf.get('architectures')}); supported: {', '.join(SUPPORTED_ARCHS)} "
                              "(Qwen2/Qwen2.5, Qwen3, Llama 2/3).")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("use_sliding_window") or hf.get("mlp_bias"):
        raise CheckpointError("sliding-window attention and MLP biases are not supported")
    theta, scaling = _rope(hf)
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    dtype = dtype if dtype in _NP_DTYPES else "float32"
    return ModelConfig(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"], rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        attention_out_bias=arch != "qwen2" and bool(hf.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        param_dtype=param_dtype or dtype, compute_dtype=compute_dtype or param_dtype or dtype)


def config_to_hf(cfg: ModelConfig):
    """A `transformers` config object for our `ModelConfig`."""
    import transformers

    if cfg.arch == "qwen2" and (not cfg.attention_bias or cfg.attention_out_bias):
        raise CheckpointError("a qwen2 model has q/k/v biases and no o-projection bias; set "
                              "attention_bias=True, attention_out_bias=False")
    if cfg.arch != "qwen2" and cfg.attention_bias != cfg.attention_out_bias:
        raise CheckpointError(f"a {cfg.arch} model's attention_bias covers q/k/v and o together; "
                              "set attention_bias and attention_out_bias to the same value")
    if cfg.qk_norm != (cfg.arch == "qwen3"):
        raise CheckpointError("q/k RMSNorm (qk_norm=True) is what makes a qwen3 model; use "
                              "arch='qwen3' with qk_norm=True, or another arch without it")
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.hd, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
              tie_word_embeddings=cfg.tie_word_embeddings,
              max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
              architectures=[_HF_CLASSES[cfg.arch]], dtype=cfg.param_dtype)
    if cfg.rope_scaling is not None:
        sc = cfg.rope_scaling
        kw["rope_scaling"] = {"rope_type": sc.kind, "factor": sc.factor} | (
            {"low_freq_factor": sc.low_freq_factor, "high_freq_factor": sc.high_freq_factor,
             "original_max_position_embeddings": sc.original_max_position_embeddings}
            if sc.kind == "llama3" else {}) | (
            {"original_max_position_embeddings": sc.original_max_position_embeddings,
             "beta_fast": sc.beta_fast, "beta_slow": sc.beta_slow, "truncate": sc.truncate}
            | {k: getattr(sc, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
               if getattr(sc, k) is not None}
            if sc.kind == "yarn" else {})
    if cfg.arch != "qwen2":
        kw["attention_bias"] = cfg.attention_bias
    return transformers.AutoConfig.for_model(cfg.arch, **kw)


# ----------------------------------------------------------------------------- safetensors


def _read_header(f) -> tuple[dict, int]:
    n = struct.unpack("<Q", f.read(8))[0]
    return json.loads(f.read(n)), 8 + n


def _mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in one file (nothing is read until used)."""
    with open(path, "rb") as f:
        header, offset = _read_header(f)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        count = (end - start) // dt.itemsize
        arr = np.memmap(path, dtype=dt, mode="r", offset=offset + start, shape=(count,)) \
            if count else np.zeros((0,), dt)
        out[name] = arr.reshape(info["shape"])
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under the real name


def _open_checkpoint(d: Path) -> dict[str, np.ndarray]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in d.iterdir())
        raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json "
                              f"(found: {found}). PyTorch .bin checkpoints are not read (they "
                              "unpickle); convert them with transformers' save_pretrained().")
    tensors = {}
    for fname in files:
        if not (d / fname).exists():
            raise CheckpointError(f"{d}: shard {fname} listed in the index is missing")
        tensors |= _mmap_safetensors(d / fname)
    return tensors


# ----------------------------------------------------------------------------- name mapping
# Each entry: our layer key -> (HF suffix, to_ours(hf_array, cfg), to_hf(our_array, cfg)).


def _layer_map(cfg: ModelConfig):
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.hd
    m = {
        "attn_norm": ("input_layernorm.weight", lambda w: w, lambda w: w),
        "mlp_norm": ("post_attention_layernorm.weight", lambda w: w, lambda w: w),
        "wq": ("self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, hd), lambda w: w.reshape(d, -1).T),
        "wk": ("self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, hd), lambda w: w.reshape(d, -1).T),
        "wv": ("self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, hd), lambda w: w.reshape(d, -1).T),
        "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(-1, d).T),
        "w_gate": ("mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
        "w_up": ("mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
        "w_down": ("mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
    }
    if cfg.attention_bias:
        m |= {f"b{x}": (f"self_attn.{x}_proj.bias", (lambda n: lambda w: w.reshape(n, hd))(n),
                        lambda w: w.reshape(-1)) for x, n in (("q", h), ("k", k), ("v", k))}
    if cfg.attention_out_bias:
        m["bo"] = ("self_attn.o_proj.bias", lambda w: w, lambda w: w)
    if cfg.qk_norm:
        m |= {"q_norm": ("self_attn.q_norm.weight", lambda w: w, lambda w: w),
              "k_norm": ("self_attn.k_norm.weight", lambda w: w, lambda w: w)}
    return m


def _hf_shape(cfg: ModelConfig, key: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    to_hf = _layer_map(cfg)[key][2]
    return to_hf(np.empty(ours, np.int8)).shape


def load(path: str | os.PathLike, *, param_dtype: str | None = None,
         compute_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face directory or hub id; tensors cast to `param_dtype`
    (default: the checkpoint's dtype). Params are host numpy arrays; `jax.device_put` them with
    the shardings you want."""
    cfg, params, _, _ = _load(path, param_dtype, compute_dtype, head="lm_head")
    return cfg, params


def load_sequence_classifier(path: str | os.PathLike, *, param_dtype: str | None = None,
                             compute_dtype: str | None = None) -> tuple[ModelConfig, dict, np.ndarray, dict]:
    """(cfg, params, score_DxC, hf_config) from a `*ForSequenceClassification` checkpoint
    (`Qwen2ForSequenceClassification`, `LlamaForSequenceClassification`, ...): the backbone under
    `model.`, and the head `score.weight` [C, D] (C = num_labels, no bias), returned transposed as
    [D, C]. `params` has no "lm_head" (such a checkpoint has none): use it with `model.hidden`,
    not `model.forward`. `hf_config` is the parsed config.json (for `pad_token_id`)."""
    cfg, params, score, hf = _load(path, param_dtype, compute_dtype, head="score")
    return cfg, params, score, hf


def _load(path, param_dtype, compute_dtype, *, head: str):
    """Shared body of `load` (head="lm_head") and `load_sequence_classifier` (head="score")."""
    d = resolve(path)
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d}: config.json is missing; a Hugging Face model directory needs "
                              "config.json and model.safetensors")
    hf = json.loads((d / "config.json").read_text())
    cfg = config_from_hf(hf, param_dtype=param_dtype, compute_dtype=compute_dtype)
    tensors = _open_checkpoint(d)
    from grpo_jax.model import param_shapes

    shapes = param_shapes(cfg)
    dtype = np.dtype(_NP_DTYPES[cfg.param_dtype])
    lmap = _layer_map(cfg)

    expected = {"model.embed_tokens.weight": shapes["embed"].shape,
                "model.norm.weight": shapes["final_norm"].shape}
    if head == "score":
        # A classifier has no LM head, tied or not: only the [num_labels, D] score matrix.
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2  # transformers' default
        expected["score.weight"] = (labels, cfg.hidden_size)
    elif not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = shapes["lm_head"].shape[::-1]
    for i in range(cfg.num_layers):
        for key, (suffix, _, _) in lmap.items():
            expected[f"model.layers.{i}.{suffix}"] = _hf_shape(cfg, key, shapes["layers"][key].shape[1:])
    present = {n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)}
    if head == "lm_head" and cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied copy too
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        hint = ""
        if head == "lm_head" and "score.weight" in unexpected:
            hint = (" This is a *ForSequenceClassification checkpoint (score.weight): read it with "
                    "hf_io.load_sequence_classifier, or register it as a reward with "
                    "grpo_jax.rewards.model_based.register_model_reward(kind='reward_model').")
        elif head == "score" and "score.weight" in missing:
            hint = (" A sequence classifier needs score.weight [num_labels, hidden_size]; "
                    "a causal LM is read with hf_io.load.")
        raise CheckpointError(f"{d}: checkpoint does not match config.json ({cfg.arch}); "
                              f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                              f"unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                              f"{hint}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{d}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {tuple(shape)}")

    def get(name):
        return np.asarray(tensors[name]).astype(dtype)

    layers = {key: np.stack([to_ours(get(f"model.layers.{i}.{suffix}"))
                             for i in range(cfg.num_layers)])
              for key, (suffix, to_ours, _) in lmap.items()}
    params = {"embed": get("model.embed_tokens.weight"), "layers": layers,
              "final_norm": get("model.norm.weight")}
    score = None
    if head == "score":
        score = np.ascontiguousarray(get("score.weight").T)
    elif not cfg.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return cfg, params, score, hf


def save(params: dict, cfg: ModelConfig, path: str | os.PathLike, *, tokenizer=None,
         max_shard_bytes: int = 4 << 30) -> Path:
    """Write a Hugging Face directory: config.json, safetensors (sharded with an index when larger
    than `max_shard_bytes`) and, if given, the tokenizer files."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(_NP_DTYPES[cfg.param_dtype])

    def host(a):
        return np.asarray(a).astype(dtype)

    tensors = {"model.embed_tokens.weight": host(params["embed"])}
    for key, (suffix, _, to_hf) in _layer_map(cfg).items():
        stacked = host(params["layers"][key])
        for i in range(cfg.num_layers):
            tensors[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(to_hf(stacked[i]))
    tensors["model.norm.weight"] = host(params["final_norm"])
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(host(params["lm_head"]).T)

    shards, cur, size = [], {}, 0
    for name, a in tensors.items():
        if cur and size + a.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = a, size + a.nbytes
    shards.append(cur)
    for stale in list(d.glob("model*.safetensors")) + [d / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_safetensors(d / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(d / fname, shard)
            weight_map |= {n: fname for n in shard}
        total = sum(a.nbytes for a in tensors.values())
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config_to_hf(cfg).save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike, *, vocab_size: int | None = None,
                   trust_remote_code: bool = False):
    """The tokenizer of a model directory, loaded faithfully.

    First the class `tokenizer_config.json` names, loaded directly (no torch import), if it
    reproduces `tokenizer.json`; else `AutoTokenizer`, which picks a class from the config and for
    some classes rebuilds the tokenizer from vocab/merges files instead of reading
    `tokenizer.json`. When that result disagrees with the directory's own `tokenizer.json`, the
    file wins (loaded as a `PreTrainedTokenizerFast`, with the special tokens and chat template of
    `tokenizer_config.json` / `chat_template.jinja`)."""
    import tokenizers
    import transformers

    d = resolve(path)
    tj = d / "tokenizer.json"
    raw = tokenizers.Tokenizer.from_file(str(tj)) if tj.exists() else None
    tok = _declared_tokenizer(d, raw)
    if tok is not None:
        return _checked(tok, d, vocab_size)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    except Exception as e:
        if raw is None:
            raise CheckpointError(f"{d}: no tokenizer could be loaded ({type(e).__name__}: {e}); "
                                  "the directory needs tokenizer.json or the files of its "
                                  "tokenizer class") from e
        tok = None
    if raw is not None:
        if tok is None or not _agrees(tok, raw):
            kw = {}
            tc = d / "tokenizer_config.json"
            if tc.exists():
                conf = json.loads(tc.read_text())
                kw = {k: conf[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                           "chat_template", "model_max_length")
                      if isinstance(conf.get(k), (str, int))}
            if "chat_template" not in kw and (d / "chat_template.jinja").exists():
                kw["chat_template"] = (d / "chat_template.jinja").read_text()
            tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **kw)
    return _checked(tok, d, vocab_size)


def _declared_tokenizer(d: Path, raw):
    """The tokenizer class that `tokenizer_config.json` names, loaded directly, if it reproduces
    the directory's `tokenizer.json`; else None. `AutoTokenizer` would first build the model's
    config, and importing `transformers`' config code imports torch when it is installed
    (+216 MiB of resident memory, measured), which a JAX process does not need."""
    import transformers

    tc = d / "tokenizer_config.json"
    if raw is None or not tc.exists():
        return None
    conf = json.loads(tc.read_text())
    name = conf.get("tokenizer_class")
    if not isinstance(name, str) or "auto_map" in conf:  # remote code: AutoTokenizer's business
        return None
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        return None
    try:
        tok = cls.from_pretrained(d)
    except Exception:  # noqa: BLE001 (any failure: let AutoTokenizer try)
        return None
    return tok if _agrees(tok, raw) else None


def _checked(tok, d: Path, vocab_size: int | None):
    if vocab_size is not None and len(tok) > vocab_size:
        raise CheckpointError(f"{d}: the tokenizer has {len(tok)} tokens but the model's vocabulary "
                              f"has {vocab_size} rows; ids past {vocab_size - 1} would index "
                              "outside the embedding. Use the tokenizer that belongs to the model.")
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere; any id will do
    return tok


_PROBE = "Compute 37+58. <think>x = 1,234</think> <answer>42</answer>\n Hello wörld 数学"


def _agrees(tok, raw) -> bool:
    ours = tok(_PROBE, add_special_tokens=False)["input_ids"]
    theirs = raw.encode(_PROBE, add_special_tokens=False).ids
    return ours == theirs and tok.get_vocab() == raw.get_vocab(with_added_tokens=True)
