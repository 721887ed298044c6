"""The policy: a Llama / Qwen2 / Qwen3 decoder as pure functions over a weights pytree.

Weights are a nested dict of arrays. The layers are stacked along a leading "layers" axis and run
with `lax.scan`, which keeps compile time flat in depth. Every weight declares logical axis names
(`param_axes`) that `sharding.py` maps to mesh axes.

Precision: matmuls run in `cfg.compute_dtype`; RMSNorm, RoPE, the attention softmax and log-probs
run in float32.

Shapes (SPEC.md section 6): B batch, L sequence, S kv-cache length, D hidden, H query heads,
K kv heads, Hd head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.config import ModelConfig
from grpo_jax.sharding import constrain

Params = dict[str, Any]
# {"k": (one [B, K, Hd, S] array per layer), "v": (one [B, K, S, Hd] per layer)}. One array per
# layer, so that a decode step writes its new slot in place; heads first, and keys stored
# transposed, so that both attention products read the cache as plain row-major matmul operands
# (q @ K^T with K^T stored: the score product ran 2x faster than from [B, K, S, Hd] keys,
# docs/benchmarks.md, session 7).
Cache = dict[str, tuple[jax.Array, ...]]

# Logical axes of the activations constrained at block boundaries (no-ops on one device).
RESIDUAL_AXES = ("batch", "length", "act_embed")  # [B, L, D], between layers
CACHE_AXES = ("batch", "act_kv_heads", None, None)  # keys [B, K, Hd, S], values [B, K, S, Hd]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_MASKED = -1e30  # finite, so fully masked rows (left padding) stay NaN-free


# ----------------------------------------------------------------------------- weights


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every weight, in the same pytree structure as the params."""
    layer = {
        "attn_norm": ("layers", "norm"),
        "wq": ("layers", "embed", "q_heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "q_heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if cfg.attention_bias:
        layer |= {"bq": ("layers", "q_heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
                  "bv": ("layers", "kv_heads", "head_dim")}
    if cfg.attention_out_bias:
        layer["bo"] = ("layers", "embed")
    if cfg.qk_norm:
        layer |= {"q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim")}
    axes = {"embed": ("vocab", "embed"), "layers": layer, "final_norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` of every weight (no memory allocated)."""
    n, d, f, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.hd
    h, k, v = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    sizes = {"layers": n, "embed": d, "mlp": f, "head_dim": hd, "q_heads": h, "kv_heads": k,
             "vocab": v, "norm": d}
    dtype = DTYPES[cfg.param_dtype]
    return jax.tree.map(lambda ax: jax.ShapeDtypeStruct(tuple(sizes[a] for a in ax), dtype),
                        param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random init as in `transformers` (normal(0, std) matrices, unit norms, zero biases)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    def one(path, s, k):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(s.shape, s.dtype)
        if name[-5:] in ("['bq']", "['bk']", "['bv']", "['bo']"):
            return jnp.zeros(s.shape, s.dtype)
        return (std * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)

    return jax.tree.unflatten(treedef, [one(p, s, k) for (p, s), k in zip(leaves, keys)])


# ----------------------------------------------------------------------------- building blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
    """x [..., *K] . w [*K, *O] -> [..., *O]: the last `n_in` dims of x contracted with the first
    `n_in` of w, as one 2-D matmul [M, K] x [K, O] (`out_dtype`: the preferred element type).

    Its gradient is written out as 2-D matmuls too: dx = g w^T, dw = x^T g (contracting the M
    rows of both). Left to autodiff, the einsum's weight gradient contracts over the batch and
    length dims, and XLA:CPU lays the activation gradient out transposed for it, in loop fusions
    that write across rows: measured 24 such copies and 180 -> 126 ms for the gradient of four
    SwiGLU MLPs on [2048, 256] tokens (docs/benchmarks.md, session 4)."""
    return _dense_fwd(x, w, n_in, out_dtype)[0]


def _dense_2d(x, w, n_in):
    k = math.prod(w.shape[:n_in])
    return x.reshape(-1, k), w.reshape(k, -1)


def _dense_fwd(x, w, n_in, out_dtype):
    x2, w2 = _dense_2d(x, w, n_in)
    y = jax.lax.dot_general(x2, w2, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:]), (x, w)


def _dense_bwd(n_in, out_dtype, res, g):
    x, w = res
    x2, w2 = _dense_2d(x, w, n_in)
    g2 = g.reshape(x2.shape[0], w2.shape[1])
    dx = jax.lax.dot_general(g2, w2, (((1,), (1,)), ((), ())), preferred_element_type=x.dtype)
    dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=w.dtype)
    return dx.reshape(x.shape), dw.reshape(w.shape)


dense.defvjp(_dense_fwd, _dense_bwd)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """RMSNorm over `axis` (the features; another axis than the last in the feature-major
    decode), computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    w_shape = [1] * x.ndim
    w_shape[axis] = -1
    return (y * w.astype(jnp.float32).reshape(w_shape)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [Hd/2], with Llama 3 / linear / YaRN scaling as in
    `transformers`."""
    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    sc = cfg.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    if sc.kind == "linear":
        return (inv / sc.factor).astype(np.float32)
    if sc.kind == "yarn":
        return _yarn_inv_freq(inv, hd, cfg.rope_theta, sc)
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old = sc.original_max_position_embeddings
    low_wavelen, high_wavelen = old / sc.low_freq_factor, old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(inv: np.ndarray, hd: int, theta: float, sc) -> np.ndarray:
    """YaRN (arXiv:2309.00071) as in `transformers`: the dimensions that rotate more than
    `beta_fast` times over the original context keep their frequency, those below `beta_slow`
    rotations are divided by `factor`, and a linear ramp blends the two in between."""
    def dim_of(rotations):  # the dimension that rotates `rotations` times over the context
        return hd * math.log(sc.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = dim_of(sc.beta_fast), dim_of(sc.beta_slow)
    if sc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # as `transformers`: no division by zero
    ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return (inv / sc.factor * (1 - keep) + inv * keep).astype(np.float32)


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor on RoPE's cos and sin (YaRN's attention factor; 1 otherwise)."""
    sc = cfg.rope_scaling
    if sc is None or sc.kind != "yarn":
        return 1.0
    if sc.attention_factor is not None:
        return float(sc.attention_factor)
    mscale = lambda m=1.0: 1.0 if sc.factor <= 1 else 0.1 * m * math.log(sc.factor) + 1.0
    if sc.mscale and sc.mscale_all_dim:
        return mscale(sc.mscale) / mscale(sc.mscale_all_dim)
    return mscale()


def rope_cos_sin(positions_BxL: jax.Array, cfg: ModelConfig, max_pos: int | None = None):
    """RoPE's cos and sin [B, L, Hd/2] (float32) at `positions`, once per forward for all layers.

    With `max_pos` (the callers' positions lie in [0, max_pos) by construction), they are looked
    up in a table of the max_pos positions made on the host. Computed in the program, XLA:CPU
    fuses cos and sin into every consumer and evaluates them per element of q and k (8x for q:
    4 heads x 2 halves): measured 4.0 -> 1.7 ms for the projection + RoPE + transpose of
    [64, 32, 4, 64] queries, 9.7 -> 5.9 ms with their gradient. The table holds the same values
    (the float32 angle, as `transformers` computes it, then cos / sin, times YaRN's attention
    factor `rope_attention_scale`); indices are clipped."""
    inv, scale = rope_inv_freq(cfg), np.float32(rope_attention_scale(cfg))
    if max_pos is None:
        freqs = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv)
        if scale == 1:
            return jnp.cos(freqs), jnp.sin(freqs)
        return jnp.cos(freqs) * scale, jnp.sin(freqs) * scale
    angle = (np.arange(max_pos, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    table = lambda f: jnp.asarray(f(angle).astype(np.float32) * scale)
    return (jnp.take(table(np.cos), positions_BxL, axis=0, mode="clip"),
            jnp.take(table(np.sin), positions_BxL, axis=0, mode="clip"))


def apply_rope(x_BxLxNxHd: jax.Array, rope) -> jax.Array:
    """Rotate-half RoPE (the `transformers` convention), computed in float32; `rope` is
    `rope_cos_sin(...)` of x's positions."""
    return _rotate_half(x_BxLxNxHd, rope[0][:, :, None, :], rope[1][:, :, None, :], axis=-1)


def _rotate_half(x: jax.Array, cos, sin, axis: int) -> jax.Array:
    """x's two halves along `axis` (the head dim) rotated by cos/sin (broadcast against a half)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=axis)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis).astype(x.dtype)


def attention(q_BxLxHxHd, k_BxKxSxHd, v_BxKxSxHd, allowed_BxLxS, *,
              keys_transposed: bool = False) -> jax.Array:
    """Grouped-query attention with a boolean mask; float32 scores and softmax. Keys and values
    are head-major ([B, K, S, Hd]; with `keys_transposed` the keys are [B, K, Hd, S], the cache
    layout). The G = H / K query heads of a kv head and the L positions form one matrix, so each
    score and output product is a single batched matmul over (B, K) in the operands' own
    layout."""
    b, l, h, hd = q_BxLxHxHd.shape
    kv, s = v_BxKxSxHd.shape[1], v_BxKxSxHd.shape[2]
    g = h // kv
    q = q_BxLxHxHd.reshape(b, l, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * l, hd)
    spec = "bkqd,bkds->bkqs" if keys_transposed else "bkqd,bksd->bkqs"
    scores = jnp.einsum(spec, q, k_BxKxSxHd, preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(allowed_BxLxS[:, None, None], scores.reshape(b, kv, g, l, s), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxHd.dtype).reshape(b, kv, g * l, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_BxKxSxHd).reshape(b, kv, g, l, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, hd)


def _heads_first(x_BxLxKxHd: jax.Array) -> jax.Array:
    return x_BxLxKxHd.transpose(0, 2, 1, 3)


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
    """Positions of a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def _qkv(x, lp, cfg: ModelConfig, rope, heads_first: bool = True):
    """Queries [B, L, H, Hd] and head-major keys/values [B, K, L, Hd], RoPE applied (keys and
    values [B, L, K, Hd] without `heads_first`)."""
    cd = DTYPES[cfg.compute_dtype]
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps).astype(cd)
    q = dense(h, lp["wq"].astype(cd))
    k = dense(h, lp["wk"].astype(cd))
    v = dense(h, lp["wv"].astype(cd))
    if cfg.attention_bias:
        q, k, v = q + lp["bq"].astype(cd), k + lp["bk"].astype(cd), v + lp["bv"].astype(cd)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    return (q, _heads_first(k), _heads_first(v)) if heads_first else (q, k, v)


def _attn_out_mlp(x, o_BxLxHxHd, lp, cfg: ModelConfig):
    """Output projection + residual, then the SwiGLU MLP + residual."""
    cd = DTYPES[cfg.compute_dtype]
    o = dense(o_BxLxHxHd, lp["wo"].astype(cd), 2)
    if cfg.attention_out_bias:
        o = o + lp["bo"].astype(cd)
    x = x + o.astype(x.dtype)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps).astype(cd)
        gate = jax.nn.silu(dense(h, lp["w_gate"].astype(cd)))
        up = dense(h, lp["w_up"].astype(cd))
        x = x + dense(gate * up, lp["w_down"].astype(cd)).astype(x.dtype)
    return constrain(x, RESIDUAL_AXES)


def _cache_write(ck, cv, k_BxKxLxHd, v_BxKxLxHd, index):
    """This layer's cache (keys [B, K, Hd, S], values [B, K, S, Hd]) with L new keys and values
    written at slots [index, index + L) (in place when the buffer is donated)."""
    ck = jax.lax.dynamic_update_slice(ck, k_BxKxLxHd.swapaxes(2, 3).astype(ck.dtype),
                                      (0, 0, 0, index))
    cv = jax.lax.dynamic_update_slice(cv, v_BxKxLxHd.astype(cv.dtype), (0, 0, index, 0))
    return constrain(ck, CACHE_AXES), constrain(cv, CACHE_AXES)


def _layer_params(layers, i: int) -> Params:
    """Layer i's weights, from per-layer dicts (`split_layers`) or stacked arrays."""
    return layers[i] if isinstance(layers, (tuple, list)) else jax.tree.map(lambda w: w[i], layers)


def _layer(x, lp, *, cfg: ModelConfig, rope, allowed, cache=None, index=0):
    """One pre-norm block. `cache` is this layer's (k [B, K, Hd, S], v [B, K, S, Hd]) or None."""
    with jax.named_scope("attention"):
        q, k, v = _qkv(x, lp, cfg, rope)
        if cache is not None:
            # Write this step's keys/values into their slots (in place: the buffer is donated),
            # then attend over every slot.
            ck, cv = cache = _cache_write(*cache, k, v, index)
            o = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), allowed, keys_transposed=True)
        else:
            o = attention(q, k, v, allowed)
    return _attn_out_mlp(x, o, lp, cfg), cache


def _over_layers(body, carry, layers, cfg: ModelConfig):
    """`body(carry, layer_params) -> (carry, None)` over the stacked layers: `lax.scan` (compile
    time flat in depth), or a Python loop when `cfg.use_scan` is off (no stacking of per-layer
    activations and gradients; faster for shallow models). Rematerialized if `cfg.remat`."""
    if cfg.remat:  # outside a scan, XLA would merge the recomputation back unless told not to
        body = jax.checkpoint(body, prevent_cse=not cfg.use_scan)
    if cfg.use_scan:
        return jax.lax.scan(body, carry, layers)
    for i in range(cfg.num_layers):
        carry, _ = body(carry, jax.tree.map(lambda w: w[i], layers))
    return carry, None


def embed_tokens(params: Params, tokens_BxL) -> jax.Array:
    """Float32 embeddings [B, L, D]. On a mesh, the table is first gathered over its embed dim
    (FSDP), so that each batch shard looks its rows up locally; looked up straight from the
    FSDP layout, XLA would have to move the sharding from the embed dim to the batch dim, which
    it does by replicating the whole activation."""
    table = constrain(params["embed"], ("vocab", None))
    return constrain(table[tokens_BxL].astype(jnp.float32), RESIDUAL_AXES)


def decoder(params: Params, tokens_BxL, cfg: ModelConfig, *, positions_BxL, allowed_BxLxS,
            cache: Cache | None = None, index=0, max_pos: int | None = None):
    """Embeddings, all layers and the final norm: returns (hidden [B, L, D] float32, cache).
    `max_pos`: a bound on the positions, if known (`rope_cos_sin`).

    Without a cache, keys are the L input tokens and the layers run under `lax.scan` (compile
    time flat in depth, the training path). With one, the L new keys/values are written at cache
    slots [index, index + L) and queries attend over all S slots (`allowed_BxLxS`); the layers
    are unrolled so that each layer's cache buffer is updated in place (the sampling path)."""
    x = embed_tokens(params, tokens_BxL)
    layer = functools.partial(_layer, cfg=cfg, rope=rope_cos_sin(positions_BxL, cfg, max_pos),
                              allowed=allowed_BxLxS, index=index)
    if cache is not None:
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            x, (k, v) = layer(x, _layer_params(params["layers"], i),
                              cache=(cache["k"][i], cache["v"][i]))
            new_k.append(k)
            new_v.append(v)
        cache = {"k": tuple(new_k), "v": tuple(new_v)}
    else:
        def body(x, lp):
            return layer(x, lp)[0], None

        x, _ = _over_layers(body, x, params["layers"], cfg)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache


def unembed(params: Params, h_BxLxD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Float32 logits [B, L, V]."""
    cd = DTYPES[cfg.compute_dtype]
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return dense(h_BxLxD.astype(cd), w.astype(cd), 1, jnp.float32)


def _causal_allowed(mask_BxL: jax.Array) -> jax.Array:
    l = mask_BxL.shape[1]
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))
    return causal[None] & mask_BxL.astype(bool)[:, None, :]


# ----------------------------------------------------------------------------- public API


def hidden(params: Params, tokens, cfg: ModelConfig, mask=None, positions=None, *,
           max_pos: int | None = None) -> jax.Array:
    """Final hidden states [B, L, D] of a (left-padded) batch. Given `positions`, `max_pos` may
    bound them (faster RoPE, `rope_cos_sin`); the mask's own positions are below L."""
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    if positions is None:
        positions, max_pos = positions_from_mask(mask), tokens.shape[1]
    h, _ = decoder(params, tokens, cfg, positions_BxL=positions, allowed_BxLxS=_causal_allowed(mask),
                   max_pos=max_pos)
    return h


def forward(params: Params, tokens, cfg: ModelConfig, mask=None, positions=None) -> jax.Array:
    """Logits [B, L, V] (float32) for int32 tokens [B, L].

    `mask` [B, L] marks real tokens (1) and padding (0); padded keys are never attended to and
    positions count real tokens only, so left padding does not change the real tokens' logits.
    `positions` [B, L] overrides the positions derived from the mask."""
    return unembed(params, hidden(params, tokens, cfg, mask, positions), cfg)


def logprobs_from_hidden(params: Params, h_BxTxD, targets_BxT, cfg: ModelConfig, *,
                         return_entropy: bool = False):
    """log p(targets) [B, T] float32 from final hidden states (and entropies, optional).

    Logits are produced `cfg.logits_chunk` positions at a time under `jax.checkpoint`, so at most
    [B, chunk, V] float32 logits are alive, in the forward and in the backward pass."""
    b, t, d = h_BxTxD.shape
    c = min(cfg.logits_chunk, t)
    pad = (-t) % c
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)
    tg = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(args):
        h_c, t_c = args
        logp = jax.nn.log_softmax(unembed(params, h_c, cfg), axis=-1)
        picked = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return picked, ent

    if h.shape[0] == 1:  # one chunk: no loop around it
        logps, ents = jax.tree.map(lambda x: x[None], chunk((h[0], tg[0])))
    else:
        logps, ents = jax.lax.map(chunk, (h, tg))
    logps = logps.swapaxes(0, 1).reshape(b, -1)[:, :t]
    ents = ents.swapaxes(0, 1).reshape(b, -1)[:, :t]
    return (logps, ents) if return_entropy else logps


def token_logprobs(params: Params, tokens_BxL, cfg: ModelConfig, mask_BxL=None, positions_BxL=None,
                   *, return_entropy: bool = False):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) as [B, L-1] float32 (and the entropies, optional)."""
    h = hidden(params, tokens_BxL, cfg, mask_BxL, positions_BxL)[:, :-1]
    targets = jnp.asarray(tokens_BxL, jnp.int32)[:, 1:]
    return logprobs_from_hidden(params, h, targets, cfg, return_entropy=return_entropy)


def grouped_logprobs(params: Params, prompt_BxP, prompt_mask_BxP, comp_NxT, comp_mask_NxT,
                     cfg: ModelConfig, *, group_size: int, return_entropy: bool = False):
    """log p(comp[n, t] | prompt[n // G], comp[n, :t]) as [N, T] (and entropies, optional).

    Rows n*G .. n*G+G-1 share prompt n, as the sampler lays them out. Each prompt goes through the
    layers once and its keys/values are shared by its G completions, which saves (G-1)/G of the
    prompt's work in the forward and the backward pass against `token_logprobs` on the
    concatenated [N, P+T] rows (same values). Prompts are left-padded.

    The layers see one row per prompt, [B, P + G*T, D]: the prompt's P tokens, then its G
    completions' T tokens each. Every projection and MLP is then one matmul over all tokens (and
    its weight gradient one matmul too); only attention splits a row into its prompt and its G
    completions. Kept apart, the prompts' [B*P, D] matmuls ran at a fraction of the big ones'
    speed (docs/benchmarks.md, session 5)."""
    g = group_size
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    comp_NxT = jnp.asarray(comp_NxT, jnp.int32)
    pmask = jnp.asarray(prompt_mask_BxP).astype(bool)
    cmask = jnp.asarray(comp_mask_NxT).astype(bool)
    (b, p), (n, t) = prompt_BxP.shape, comp_NxT.shape
    rows = lambda prompt_part, comp_part: jnp.concatenate(  # [B, P, ...] + [N, T, ...]
        [prompt_part, comp_part.reshape(b, g * t, *comp_part.shape[2:])], axis=1)
    rope = tuple(map(rows, rope_cos_sin(positions_from_mask(pmask), cfg, p + t), rope_cos_sin(
        jnp.repeat(pmask.sum(-1), g)[:, None] + jnp.arange(t)[None], cfg, p + t)))
    allowed_p = _causal_allowed(pmask)
    allowed_c = jnp.concatenate(
        [jnp.broadcast_to(jnp.repeat(pmask, g, 0)[:, None, :], (n, t, p)), _causal_allowed(cmask)],
        axis=-1)  # [N, T, P + T]: the own prompt, then the completion causally

    def parts(a):  # [B, P + G*T, ...] -> prompts [B, P, ...], completions [N, T, ...]
        return a[:, :p], a[:, p:].reshape(n, t, *a.shape[2:])

    def body(x, lp):
        with jax.named_scope("attention"):
            q, k, v = _qkv(x, lp, cfg, rope, heads_first=False)
            (qp, qc), (kp, kc), (vp, vc) = parts(q), parts(k), parts(v)
            kp, kc, vp, vc = map(_heads_first, (kp, kc, vp, vc))
            op = attention(qp, kp, vp, allowed_p)
            k = jnp.concatenate([jnp.repeat(kp, g, 0), kc], axis=2)
            v = jnp.concatenate([jnp.repeat(vp, g, 0), vc], axis=2)
            oc = attention(qc, k, v, allowed_c)
        return _attn_out_mlp(x, rows(op, oc), lp, cfg), None

    x0 = rows(embed_tokens(params, prompt_BxP), embed_tokens(params, comp_NxT))
    xp, xc = parts(_over_layers(body, x0, params["layers"], cfg)[0])
    # The prompt's last position predicts completion token 0; completion position t predicts t+1.
    h_last = rms_norm(xp[:, -1:], params["final_norm"], cfg.rms_norm_eps)
    h = jnp.concatenate([jnp.repeat(h_last, g, 0),
                         rms_norm(xc[:, :-1], params["final_norm"], cfg.rms_norm_eps)], axis=1)
    return logprobs_from_hidden(params, h, comp_NxT, cfg, return_entropy=return_entropy)


def split_layers(params: Params) -> Params:
    """The same weights with "layers" as a tuple of per-layer dicts (the cached path takes both
    forms). The sampler passes them so into its program: slices of the stacked arrays inside
    the decode loop are copies, made again at every step (measured: 16% of a decode step)."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda w: w[i], params["layers"])
                                      for i in range(n))}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """Zeroed cache of `length` slots: keys [B, K, Hd, S], values [B, K, S, Hd] per layer.
    `dtype`: a name ("bfloat16") or a dtype; default the compute dtype."""
    dt = DTYPES.get(dtype, dtype) if dtype is not None else DTYPES[cfg.compute_dtype]
    shapes = {"k": (batch, cfg.num_kv_heads, cfg.hd, length),
              "v": (batch, cfg.num_kv_heads, length, cfg.hd)}
    return {name: tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
            for name, shape in shapes.items()}


def cache_fits(cache: Cache | None, rows: int, length: int) -> bool:
    """Whether `cache` (as `init_cache` makes it, any leading dims) holds `rows` rows of
    `length` slots, so that a sampler can donate it again instead of allocating a new one."""
    if cache is None:
        return False
    shape = cache["v"][0].shape  # [..., rows, K, slots, Hd]
    return (shape[-4], shape[-2]) == (rows, length)


def cached_step(params: Params, tokens_BxL, cfg: ModelConfig, *, cache: Cache, index,
                positions_BxL, kv_mask_BxS, last_only: bool = False) -> tuple[jax.Array, Cache]:
    """Run L new tokens against the cache (prefill when L > 1, decode when L = 1).

    The new tokens occupy cache slots [index, index + L); `kv_mask_BxS` marks the valid slots,
    the new ones included. Returns float32 logits of the new tokens [B, L, V] (with `last_only`,
    of the last one only, [B, 1, V]: a prefill needs no more) and the cache. A token's position
    (it counts the real tokens before it) is at most its slot, so below S."""
    l, s = tokens_BxL.shape[1], kv_mask_BxS.shape[1]
    q_slot = index + jnp.arange(l)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [L, S]
    allowed = causal[None] & kv_mask_BxS.astype(bool)[:, None, :]
    h, cache = decoder(params, tokens_BxL, cfg, positions_BxL=positions_BxL, allowed_BxLxS=allowed,
                       cache=cache, index=index, max_pos=s)
    return unembed(params, h[:, -1:] if last_only else h, cfg), cache


# ----------------------------------------------------------------------------- group decoding
# Sampling G completions per prompt, the prompt's keys and values are the same for the G rows:
# `grouped_decode` keeps them once per prompt (the prefill's cache, [B, ...]) and only the
# generated tokens' per row ([N, ...]), so that a decode step reads each prompt's keys and
# values once per group instead of once per row.


def grouped_attention(q_NxHxHd, pk_BxKxHdxP, pv_BxKxPxHd, gk_NxKxHdxT, gv_NxKxTxHd,
                      allowed_NxS) -> jax.Array:
    """`attention` of one new token per row, N = B * G rows (rows b*G .. b*G+G-1 belong to
    prompt b), over its prompt's P shared slots, then its own T generated slots (`allowed_NxS`
    masks the P + T slots in that order). The prompt products batch over (prompt, kv head) with
    the queries of the G rows as one matrix, so each prompt key is read once per group."""
    n, h, hd = q_NxHxHd.shape
    b, kv, _, p = pk_BxKxHdxP.shape
    g, rep = h // kv, n // b
    q = q_NxHxHd.reshape(n, kv, g, hd)

    def to_prompts(x):  # [N, K, g, X] -> [B, K, G*g, X]
        return x.reshape(b, rep, kv, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, kv, rep * g, -1)

    def to_rows(x):  # [B, K, G*g, X] -> [N, K, g, X]
        return x.reshape(b, kv, rep, g, -1).transpose(0, 2, 1, 3, 4).reshape(n, kv, g, -1)

    f32 = dict(preferred_element_type=jnp.float32)
    scores = jnp.concatenate(
        [to_rows(jnp.einsum("bkqd,bkdp->bkqp", to_prompts(q), pk_BxKxHdxP, **f32)),
         jnp.einsum("nkqd,nkdt->nkqt", q, gk_NxKxHdxT, **f32)], axis=-1) / math.sqrt(hd)
    scores = jnp.where(allowed_NxS[:, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(pv_BxKxPxHd.dtype)
    out = to_rows(jnp.einsum("bkqp,bkpd->bkqd", to_prompts(probs[..., :p]), pv_BxKxPxHd))
    out = out + jnp.einsum("nkqt,nktd->nkqd", probs[..., p:], gv_NxKxTxHd)
    return out.reshape(n, h, hd)


def _grouped_allowed(prompt_mask_BxP, gen_mask_NxT) -> jax.Array:
    """The key mask [N, P + T] of a grouped decode step: each row's prompt slots, then its own."""
    rep = gen_mask_NxT.shape[0] // prompt_mask_BxP.shape[0]
    return jnp.concatenate([jnp.repeat(prompt_mask_BxP.astype(bool), rep, axis=0),
                            gen_mask_NxT.astype(bool)], axis=1)


def grouped_decode(params: Params, tokens_N, cfg: ModelConfig, *, prompt_cache: Cache,
                   gen_cache: Cache, index, positions_N, prompt_mask_BxP,
                   gen_mask_NxT) -> tuple[jax.Array, Cache]:
    """One decode step of N = B * G rows: float32 logits [N, V] and the generated-token cache.

    `prompt_cache` is the prefill's (`cached_step` over the B prompts, P slots), `gen_cache`
    the rows' own (`init_cache(cfg, N, T)`): the new keys and values go to its slot `index`,
    and the queries attend over the prompt slots (`prompt_mask_BxP`) and the generated ones
    (`gen_mask_NxT`, the new slot included)."""
    p = prompt_mask_BxP.shape[1]
    allowed = _grouped_allowed(prompt_mask_BxP, gen_mask_NxT)
    x = embed_tokens(params, tokens_N[:, None])
    rope = rope_cos_sin(positions_N[:, None], cfg, p + gen_mask_NxT.shape[1])
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
        lp = _layer_params(params["layers"], i)
        with jax.named_scope("attention"):
            q, k, v = _qkv(x, lp, cfg, rope)  # [N, 1, H, Hd], [N, K, 1, Hd]
            gk, gv = _cache_write(gen_cache["k"][i], gen_cache["v"][i], k, v, index)
            cd = q.dtype
            o = grouped_attention(q[:, 0], prompt_cache["k"][i].astype(cd),
                                  prompt_cache["v"][i].astype(cd), gk.astype(cd), gv.astype(cd),
                                  allowed)
        x = _attn_out_mlp(x, o[:, None], lp, cfg)
        new_k.append(gk)
        new_v.append(gv)
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return unembed(params, h, cfg)[:, 0], {"k": tuple(new_k), "v": tuple(new_v)}


# ----------------------------------------------------------------------------- feature-major decoding
# A decode step multiplies only N rows (N / devices per CPU device) by each weight: [32, 256] x
# [256, 768] at the benchmark shape, with the weight as the right-hand operand, which a GEMM
# library repacks into its tile layout at every call. The feature-major layout turns each
# product around: weights [out, in] on the left, activations [D, M] (features x rows) on the
# right, so the weights are read in their storage order and the operand to repack is the small
# activation (our reading of why it is faster: the profiles show the products, not their
# packing). The sampler uses it on the CPU, where the decode runs ~10% faster
# (docs/benchmarks.md, session 9), from `decode_layout(params)`: a copy of the weights made once
# per set of weights (the sampler keeps it while the params stay the same). Rows of a product
# are contiguous slices, so q/k/v and gate/up are each one matmul.


def decode_layout(params: Params, cfg: ModelConfig) -> Params:
    """The weights for `fm_prefill` / `fm_grouped_decode`: per layer (a tuple, as `split_layers`)
    "wqkv" [(H + 2K) Hd, D] (q, k, v stacked by rows), "wo" [D, H Hd], "w_gu" [2F, D] (gate then
    up), "w_down" [D, F], the norms, biases flattened the same way; "head" [V, D] (the embedding
    itself when tied). Takes stacked or per-layer params."""
    def t(w, n_in):  # [*in, *out] -> [out, in]
        return jnp.transpose(w.reshape(math.prod(w.shape[:n_in]), -1))

    layers = []
    for i in range(cfg.num_layers):
        lp = _layer_params(params["layers"], i)
        d = {"attn_norm": lp["attn_norm"], "mlp_norm": lp["mlp_norm"],
             "wqkv": jnp.concatenate([t(lp["wq"], 1), t(lp["wk"], 1), t(lp["wv"], 1)]),
             "wo": t(lp["wo"], 2),
             "w_gu": jnp.concatenate([t(lp["w_gate"], 1), t(lp["w_up"], 1)]),
             "w_down": t(lp["w_down"], 1)}
        if cfg.attention_bias:
            d["bqkv"] = jnp.concatenate([lp[b].reshape(-1) for b in ("bq", "bk", "bv")])
        if cfg.attention_out_bias:
            d["bo"] = lp["bo"]
        if cfg.qk_norm:
            d["q_norm"], d["k_norm"] = lp["q_norm"], lp["k_norm"]
        layers.append(d)
    head = params["embed"] if cfg.tie_word_embeddings else jnp.transpose(params["lm_head"])
    return {"embed": params["embed"], "head": head, "final_norm": params["final_norm"],
            "layers": tuple(layers)}


def is_decode_layout(params: Params) -> bool:
    return "head" in params


def _fm_matmul(w_OxI: jax.Array, x_IxM: jax.Array, out_dtype=None) -> jax.Array:
    return jax.lax.dot_general(w_OxI, x_IxM, (((1,), (0,)), ((), ())),
                               preferred_element_type=out_dtype)


def _fm_layer(x_DxM, lp, cfg: ModelConfig, rope, attend):
    """One pre-norm block on feature-major activations [D, M]. `attend(q [H, Hd, M],
    k [K, Hd, M], v [K, Hd, M]) -> (o [M, H Hd], extra)` does the attention (and the cache);
    returns (x [D, M], extra)."""
    m = x_DxM.shape[1]
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.hd
    cd = DTYPES[cfg.compute_dtype]
    with jax.named_scope("attention"):
        a = rms_norm(x_DxM, lp["attn_norm"], cfg.rms_norm_eps, axis=0).astype(cd)
        qkv = _fm_matmul(lp["wqkv"].astype(cd), a)
        if cfg.attention_bias:
            qkv = qkv + lp["bqkv"][:, None].astype(cd)
        q = qkv[:h * hd].reshape(h, hd, m)
        k = qkv[h * hd:(h + kv) * hd].reshape(kv, hd, m)
        v = qkv[(h + kv) * hd:].reshape(kv, hd, m)
        if cfg.qk_norm:
            q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, axis=1)
            k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, axis=1)
        cos, sin = rope[0][None], rope[1][None]  # [1, Hd/2, M]
        q, k = _rotate_half(q, cos, sin, axis=1), _rotate_half(k, cos, sin, axis=1)
        o_MxHHd, extra = attend(q, k, v)
        o = _fm_matmul(lp["wo"].astype(cd), jnp.transpose(o_MxHHd))
        if cfg.attention_out_bias:
            o = o + lp["bo"][:, None].astype(cd)
        x_DxM = x_DxM + o.astype(x_DxM.dtype)
    with jax.named_scope("mlp"):
        a = rms_norm(x_DxM, lp["mlp_norm"], cfg.rms_norm_eps, axis=0).astype(cd)
        gu = _fm_matmul(lp["w_gu"].astype(cd), a)
        f = gu.shape[0] // 2
        x_DxM = x_DxM + _fm_matmul(lp["w_down"].astype(cd),
                                   jax.nn.silu(gu[:f]) * gu[f:]).astype(x_DxM.dtype)
    return x_DxM, extra


def _fm_embed(dparams: Params, tokens_M, positions_M, cfg: ModelConfig, max_pos: int):
    """Feature-major embeddings [D, M] and RoPE cos/sin [Hd/2, M] of M tokens."""
    x = jnp.transpose(dparams["embed"][tokens_M].astype(jnp.float32))
    cos, sin = rope_cos_sin(positions_M, cfg, max_pos)
    return x, (jnp.transpose(cos), jnp.transpose(sin))


def _fm_logits(dparams: Params, x_DxM, cfg: ModelConfig) -> jax.Array:
    """Float32 logits [M, V] after the final norm."""
    cd = DTYPES[cfg.compute_dtype]
    h = rms_norm(x_DxM, dparams["final_norm"], cfg.rms_norm_eps, axis=0).astype(cd)
    logits_VxM = _fm_matmul(dparams["head"].astype(cd), h, jnp.float32)
    # the barrier keeps XLA from folding the transpose into the product (a slow dot kernel)
    return jnp.transpose(jax.lax.optimization_barrier(logits_VxM))


def fm_prefill(dparams: Params, tokens_BxP, mask_BxP, cfg: ModelConfig, *,
               cache_dtype) -> tuple[jax.Array, Cache]:
    """The prompts' last-token logits [B, V] and their cache of P slots: what `cached_step` over
    an empty cache with `last_only` returns, from `decode_layout` weights."""
    b, p = tokens_BxP.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.hd
    cd = DTYPES[cfg.compute_dtype]
    allowed = _causal_allowed(mask_BxP)
    x, rope = _fm_embed(dparams, tokens_BxP.reshape(-1),
                        positions_from_mask(mask_BxP).reshape(-1), cfg, p)

    def attend(q, k, v):  # [X, Hd, B*P] -> queries [B, P, H, Hd], the prompts' cache
        ck = k.reshape(kv, hd, b, p).transpose(2, 0, 1, 3).astype(cache_dtype)
        cv = v.reshape(kv, hd, b, p).transpose(2, 0, 3, 1).astype(cache_dtype)
        o = attention(q.reshape(h, hd, b, p).transpose(2, 3, 0, 1), ck.astype(cd), cv.astype(cd),
                      allowed, keys_transposed=True)
        return o.reshape(b * p, h * hd), (ck, cv)

    ks, vs = [], []
    for lp in dparams["layers"]:
        x, (ck, cv) = _fm_layer(x, lp, cfg, rope, attend)
        ks.append(ck)
        vs.append(cv)
    last = x.reshape(-1, b, p)[:, :, -1]
    return _fm_logits(dparams, last, cfg), {"k": tuple(ks), "v": tuple(vs)}


def fm_grouped_decode(dparams: Params, tokens_N, cfg: ModelConfig, *, prompt_cache: Cache,
                      gen_cache: Cache, index, positions_N, prompt_mask_BxP,
                      gen_mask_NxT) -> tuple[jax.Array, Cache]:
    """`grouped_decode` from `decode_layout` weights: the same logits [N, V] and cache."""
    p, n = prompt_mask_BxP.shape[1], tokens_N.shape[0]
    allowed = _grouped_allowed(prompt_mask_BxP, gen_mask_NxT)
    x, rope = _fm_embed(dparams, tokens_N, positions_N, cfg, p + gen_mask_NxT.shape[1])
    cd = DTYPES[cfg.compute_dtype]
    new_k, new_v = [], []
    for i, lp in enumerate(dparams["layers"]):
        def attend(q, k, v, i=i):  # one new slot per row: k, v [K, Hd, N] -> [N, K, Hd]
            gk, gv = _cache_write(gen_cache["k"][i], gen_cache["v"][i],
                                  jnp.transpose(k, (2, 0, 1))[:, :, None],
                                  jnp.transpose(v, (2, 0, 1))[:, :, None], index)
            o = grouped_attention(jnp.transpose(q, (2, 0, 1)), prompt_cache["k"][i].astype(cd),
                                  prompt_cache["v"][i].astype(cd), gk.astype(cd), gv.astype(cd),
                                  allowed)
            return o.reshape(n, -1), (gk, gv)

        x, (gk, gv) = _fm_layer(x, lp, cfg, rope, attend)
        new_k.append(gk)
        new_v.append(gv)
    return _fm_logits(dparams, x, cfg), {"k": tuple(new_k), "v": tuple(new_v)}
