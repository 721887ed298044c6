"""A jitted KV-cache sampler: one prefill, then a `lax.while_loop` decode.

Prompts are left-padded to a bucketed length, so that every slot index is shared by the whole
batch and a second call with the same bucket reuses the compiled program. With `group_size=G`
each prompt is prefilled once and its keys and values are kept once for its G rows (rows
b*G .. b*G+G-1 belong to prompt b; `model.grouped_decode`); each row then samples
independently, with its generated tokens' keys and values in its own cache slots.

That generated-token cache ([N, ...], T slots) is a preallocated buffer donated to the program
and handed back, so a `Sampler` reuses the same memory call after call; stale slots never count,
because the key mask only admits the slots written in this call. Long decodes attend over
it in growing windows (`SamplerConfig.cache_windows`, `decode_loop`): step t reads only the
first slots up to its window's end, not all T.

On a mesh (`Sampler(..., mesh=mesh)`) the sampler uses the decoding layout (`SAMPLE_RULES`): the
weights are resharded for the rollout (tensor-parallel, no FSDP), and the batch and the KV cache
are split over the data axes.

On the CPU, where every device holds all the weights, the sampler decodes feature-major
(`model.decode_layout`, `fm_prefill`, `fm_grouped_decode`): weights [out, in], activations
[features, rows], so that each small decode matmul reads its weights in storage order.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from grpo_jax import sharding
from grpo_jax.config import ModelConfig, SamplerConfig
from grpo_jax.model import (CACHE_AXES, Cache, Params, cache_fits, cached_step, decode_layout,
                            fm_grouped_decode, fm_prefill, grouped_decode, init_cache,
                            is_decode_layout, positions_from_mask, split_layers)
from grpo_jax.sharding import Rules, constrain


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "mask", "lengths", "logps", "sample_logps", "truncated"],
                   meta_fields=[])
@dataclasses.dataclass
class Samples:
    """What the sampler returns; N = B * G rows, T = max_new_tokens.

    `logps` are log-probs of the sampled tokens under the policy at temperature 1 (what the GRPO
    ratio needs); `sample_logps` are under the distribution actually sampled from (temperature,
    top-k, top-p applied; 0 for greedy). Both are 0 where `mask` is 0."""

    tokens: jax.Array  # [N, T] int32, pad_id after a row finishes
    mask: jax.Array  # [N, T] bool, True for generated tokens (the stop token included)
    lengths: jax.Array  # [N] int32
    logps: jax.Array  # [N, T] float32
    sample_logps: jax.Array  # [N, T] float32
    truncated: jax.Array  # [N] bool: reached max_new_tokens without a stop token


def pad_prompts(prompts: Sequence[Sequence[int]], *, bucket: int, pad_id: int = 0,
                min_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common length rounded up to a multiple of `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(max(len(p) for p in prompts), min_len)
    length = -(-longest // bucket) * bucket
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = True
    return tokens, mask


def filter_logits(logits_NxV: jax.Array, scfg: SamplerConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on float32 logits; removed entries are -inf."""
    x = logits_NxV / scfg.temperature
    if scfg.top_k > 0 and scfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, scfg.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if scfg.top_p < 1.0:
        x = jnp.where(x < _top_p_threshold(x, scfg.top_p), -jnp.inf, x)
    return x


_TOP_P_CANDIDATES = 1024


def _nucleus_threshold(sorted_x, lse, top_p):
    """The smallest logit of the nucleus, from logits sorted in descending order: a token stays
    if the mass of the tokens above it is still below top_p (the first always stays)."""
    probs = jnp.exp(sorted_x - lse)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.min(jnp.where(mass_before < top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)


def _top_p_threshold(x_NxV, top_p):
    """Exact nucleus threshold. A full sort of a 150k vocabulary costs seconds on a CPU, so the
    nucleus is first looked for among the top 1024 logits (`lax.top_k`); only when their mass
    falls short of top_p for some row is the whole vocabulary sorted."""
    lse = jax.nn.logsumexp(x_NxV, axis=-1, keepdims=True)
    k = min(_TOP_P_CANDIDATES, x_NxV.shape[-1])
    top = jax.lax.top_k(x_NxV, k)[0]
    if k == x_NxV.shape[-1]:
        return _nucleus_threshold(top, lse, top_p)
    enough = jnp.all(jnp.sum(jnp.exp(top - lse), axis=-1) >= top_p)
    return jax.lax.cond(enough, lambda: _nucleus_threshold(top, lse, top_p),
                        lambda: _nucleus_threshold(jnp.sort(x_NxV, axis=-1)[:, ::-1], lse, top_p))


def row_noise(key: jax.Array, n: int, vocab: int, offset=0) -> jax.Array:
    """Gumbel noise [n, V] for rows offset .. offset+n-1 of a batch: row r's is
    `gumbel(fold_in(key, r), [V])`, so a device that holds some rows of the batch draws their
    noise, and only theirs, as one device holding the whole batch would."""
    rows = offset + jnp.arange(n, dtype=jnp.int32)
    draw = lambda r: jax.random.gumbel(jax.random.fold_in(key, r), (vocab,), jnp.float32)
    return jax.vmap(draw)(rows)


def first_argmax(x_NxV: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first of equal maxima; the first NaN if any) as a max and a
    min, two plain reductions: XLA:CPU runs argmax's variadic (value, index) reduction
    unvectorized, 21 vs ~3 us for a [32, 128] decode step."""
    top = jnp.max(x_NxV, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_NxV.shape, x_NxV.ndim - 1)
    hit = (x_NxV == top) | jnp.isnan(x_NxV)
    return jnp.min(jnp.where(hit, iota, x_NxV.shape[-1]), axis=-1)


def sample_token(logits_NxV: jax.Array, key: jax.Array, scfg: SamplerConfig, offset=0,
                 noise_NxV=None):
    """(token [N], log-prob at temperature 1 [N], log-prob under the sampling distribution [N]).

    Tokens are drawn by Gumbel-max: the argmax of the filtered logits plus `row_noise(key, ...)`
    (`offset`: these N rows are rows offset .. offset+N-1 of a batch split over devices).
    `noise_NxV`: that noise, already drawn (`key` is then unused)."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    policy_logp = jax.nn.log_softmax(logits_NxV, axis=-1)
    if scfg.greedy:
        tok = first_argmax(logits_NxV)
        sample_logp = jnp.zeros(tok.shape, jnp.float32)
    else:
        x = filter_logits(logits_NxV, scfg)
        if noise_NxV is None:
            noise_NxV = row_noise(key, x.shape[0], x.shape[-1], offset)
        tok = first_argmax(noise_NxV + x)
        sample_logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tok[:, None], -1)[:, 0]
    pick = jnp.take_along_axis(policy_logp, tok[:, None], -1)[:, 0]
    return tok.astype(jnp.int32), pick, sample_logp


# Draw the whole decode's Gumbel noise before the loop when it takes at most this many bytes:
# one batched draw instead of a small one (a rolled threefry loop on the CPU) at every step.
NOISE_BUDGET_BYTES = 32 << 20


def decode_noise(key: jax.Array, t_max: int, n: int, vocab: int, offset=0):
    """The noise of decode steps 0 .. t_max-1 for n rows, [T, n, V] (step t's is
    `row_noise(fold_in(key, t), ...)`, what the step would draw itself), or None when it would
    take more than `NOISE_BUDGET_BYTES` (each step then draws its own)."""
    if t_max * n * vocab * 4 > NOISE_BUDGET_BYTES:
        return None
    steps = jnp.arange(t_max, dtype=jnp.int32)
    return jax.vmap(lambda t: row_noise(jax.random.fold_in(key, t), n, vocab, offset))(steps)


def _stop_ids(scfg: SamplerConfig) -> jax.Array:
    return jnp.asarray(scfg.stop_ids or (-1,), jnp.int32)


def prefill_state(params: Params, cache: Cache, tokens_BxP, mask_BxP, *, cfg: ModelConfig,
                  t_max: int, group_size: int, pad_id: int) -> dict:
    """The decode loop's first state: each prompt prefilled once (its keys and values kept once,
    for its G rows: `model.grouped_decode`), the G rows' copies of its last logits and next
    position, the generated tokens' `cache` (`init_cache(cfg, N, t_max)`, the donated buffer),
    and empty outputs. `params`: the model's, or `model.decode_layout(params)` (the
    feature-major prefill and decode)."""
    b, p = tokens_BxP.shape
    n = b * group_size
    positions = positions_from_mask(mask_BxP)
    if is_decode_layout(params):
        last, prompt_cache = fm_prefill(params, tokens_BxP, mask_BxP, cfg,
                                        cache_dtype=cache["k"][0].dtype)
    else:
        empty = init_cache(cfg, b, p, cache["k"][0].dtype)
        logits, prompt_cache = cached_step(params, tokens_BxP, cfg, cache=empty, index=0,
                                           positions_BxL=positions, kv_mask_BxS=mask_BxP,
                                           last_only=True)
        last = logits[:, -1]
    rep = functools.partial(jnp.repeat, repeats=group_size, axis=0)
    return dict(last=rep(last), prompt_cache=prompt_cache, prompt_mask=mask_BxP,
                cache=cache, pos=rep(positions[:, -1] + 1), done=jnp.zeros((n,), bool),
                tokens=jnp.full((n, t_max), pad_id, jnp.int32), mask=jnp.zeros((n, t_max), bool),
                logps=jnp.zeros((n, t_max), jnp.float32),
                sample_logps=jnp.zeros((n, t_max), jnp.float32))


def decode_step(params: Params, key, s: dict, t, *, cfg: ModelConfig, scfg: SamplerConfig,
                pad_id: int, offset=0, noise=None, forward: bool = True) -> dict:
    """One step of the decode loop on state `s` (`prefill_state`): sample new token t of every
    row from the last logits, write it and (if `forward`) run it through the model
    (`model.grouped_decode`). Rows already done get `pad_id` and keep their masks and log-probs
    unchanged. `offset`: as in `sample_token`; `noise`: `decode_noise(...)` or None. The last
    token needs no forward: nothing reads its logits."""
    tok, logp, slogp = sample_token(s["last"], jax.random.fold_in(key, t), scfg, offset,
                                    None if noise is None else noise[t])
    live = ~s["done"]
    tok = jnp.where(live, tok, pad_id)
    done = s["done"] | jnp.isin(tok, _stop_ids(scfg))
    col = lambda a, v: a.at[:, t].set(jnp.where(live, v, 0).astype(a.dtype))
    mask = col(s["mask"], True)  # also the generated slots' key mask: a live row's token t
    last, cache = s["last"], s["cache"]
    if forward:  # over the cache's slots: all of them, or a window (`decode_loop`)
        slots = cache["v"][0].shape[-2]
        decode = fm_grouped_decode if is_decode_layout(params) else grouped_decode
        last, cache = decode(params, tok, cfg, prompt_cache=s["prompt_cache"], gen_cache=cache,
                             index=t, positions_N=s["pos"], prompt_mask_BxP=s["prompt_mask"],
                             gen_mask_NxT=mask[..., :slots])
    return dict(s, last=last, cache=cache, pos=s["pos"] + 1, done=done,
                tokens=s["tokens"].at[:, t].set(tok), mask=mask,
                logps=col(s["logps"], logp), sample_logps=col(s["sample_logps"], slogp))


# A cache window has at least this many slots: below, the saved reads do not pay for the extra
# loop (docs/benchmarks.md, session 10).
MIN_CACHE_WINDOW = 64


def cache_windows(t_max: int, windows: int) -> tuple[int, ...]:
    """The slot counts of the decode's cache windows (`SamplerConfig.cache_windows`): up to
    `windows` equal windows of at least `MIN_CACHE_WINDOW` slots (multiples of 8), growing to
    all t_max slots; (t_max,) for one window."""
    k = max(1, min(windows, t_max // MIN_CACHE_WINDOW))
    size = -(-t_max // k)  # ceil
    size = -(-size // 8) * 8
    return tuple(sorted({min(t_max, size * (i + 1)) for i in range(k)}))


def _window(full: Cache, slots: int, cache: Cache | None = None) -> tuple[Cache, Cache]:
    """(the donated generated-token buffer `full`, the cache window of its first `slots` slots)
    with the last window `cache` first written back into `full` (in place). The window is a
    copy: besides `full`, the decode holds one window at a time. Its slots past `cache`'s hold
    stale values, masked as the full buffer's are."""
    def cut(f, axis):  # keys [..., Hd, S] (axis -1), values [..., S, Hd] (axis -2)
        return f if f.shape[axis] == slots else jax.lax.slice_in_dim(f, 0, slots,
                                                                      axis=f.ndim + axis)

    if cache is not None:
        full = {n: tuple(jax.lax.dynamic_update_slice(f, x, (0,) * x.ndim)
                         for f, x in zip(full[n], cache[n])) for n in ("k", "v")}
    return full, {"k": tuple(cut(f, -1) for f in full["k"]),
                  "v": tuple(cut(f, -2) for f in full["v"])}


def decode_loop(step, init: dict, scfg: SamplerConfig) -> dict:
    """`step(s, t, forward) -> s` from `init` until t_max = `scfg.max_new_tokens` tokens or until
    every row is done. The loop stops one token short; the last step samples without a forward
    (whose logits nobody would read: 1/t_max of the decode's work). If every row is done before,
    it writes pads.

    One loop per cache window (`cache_windows(t_max, scfg.cache_windows)`), whose steps (slot
    t < window) carry the generated-token cache cut to the window's first slots (`_window`: a
    copy of `init`'s donated buffer, written back before the next window)."""
    def body(carry):
        t, s = carry
        return t + 1, step(s, t, True)

    t_max = scfg.max_new_tokens
    full, t, s = init["cache"], jnp.int32(0), init
    for i, w in enumerate(cache_windows(t_max, scfg.cache_windows)):
        full, cache = _window(full, w, s["cache"] if i else None)
        end = min(w, t_max - 1)
        t, s = jax.lax.while_loop(lambda c, end=end: (c[0] < end) & ~jnp.all(c[1]["done"]),
                                  body, (t, dict(s, cache=cache)))
    return step(s, t, False)


def samples_of(s: dict, scfg: SamplerConfig) -> Samples:
    """The `Samples` of a finished decode state (any leading batch dims)."""
    lengths = s["mask"].sum(-1).astype(jnp.int32)
    last_tok = jnp.take_along_axis(s["tokens"], jnp.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
    truncated = (lengths == scfg.max_new_tokens) & ~jnp.isin(last_tok, _stop_ids(scfg))
    return Samples(tokens=s["tokens"], mask=s["mask"], lengths=lengths, logps=s["logps"],
                   sample_logps=s["sample_logps"], truncated=truncated)


def untie_for_decode(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """On the CPU, a tied embedding table is transposed once per call into an `lm_head` [D, V]
    for the decode (XLA:CPU's decode matmul against the table transposed in place ran 4x
    slower: 1.7 vs 0.55 ms a call, docs/benchmarks.md session 7). Elsewhere unchanged. Params
    may lead with a runs axis (`vectorized`)."""
    if not cfg.tie_word_embeddings or jax.default_backend() != "cpu":
        return params, cfg
    lm_head = jax.lax.optimization_barrier(jnp.swapaxes(params["embed"], -1, -2))
    return {**params, "lm_head": lm_head}, dataclasses.replace(cfg, tie_word_embeddings=False)


def _generate(params: Params, cache: Cache, tokens_BxP, mask_BxP, key, *, cfg: ModelConfig,
              scfg: SamplerConfig, group_size: int, pad_id: int, batch_axes=None):
    """Prefill and decode. Under `shard_map`, one copy of this runs on each batch shard's rows
    (`batch_axes` names the mesh axes they are split over)."""
    if not is_decode_layout(params):
        params, cfg = untie_for_decode(params, cfg)
    offset = 0  # of this shard's first row in the batch
    if batch_axes is not None:
        offset = jax.lax.axis_index(batch_axes) * tokens_BxP.shape[0] * group_size
    with jax.named_scope("prefill"):
        init = prefill_state(params, cache, tokens_BxP, mask_BxP, cfg=cfg,
                             t_max=scfg.max_new_tokens, group_size=group_size, pad_id=pad_id)
    noise = None
    if not scfg.greedy:
        noise = decode_noise(key, scfg.max_new_tokens, init["last"].shape[0], cfg.vocab_size,
                             offset)
    step = lambda s, t, forward: decode_step(params, key, s, t, cfg=cfg, scfg=scfg, pad_id=pad_id,
                                             offset=offset, noise=noise, forward=forward)
    with jax.named_scope("decode"):
        s = decode_loop(step, init, scfg)
    # On a mesh: the results split like the batch, the cache as it came in (so that it can be
    # donated again without a recompile).
    out = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), samples_of(s, scfg))
    return out, jax.tree.map(lambda c: constrain(c, CACHE_AXES), s["cache"])


_split = jax.jit(split_layers)
_decode_layout = jax.jit(decode_layout, static_argnums=1)


@functools.lru_cache(maxsize=16)
def _generate_under(mesh, rules: Rules):
    """`_generate` tracing with `rules` on `mesh`: one function per layout, so that Samplers of
    the same layout (e.g. an evaluation's, built per call) share their compiled programs."""
    return sharding.under_rules(_generate, mesh, rules)


@functools.lru_cache(maxsize=16)
def _generate_per_shard(mesh, batch_axes):
    """`_generate` as independent programs, one per batch shard of `mesh` (weights
    replicated): no collective at all, and each shard leaves the loop when its own rows are done.
    On a CPU with one XLA device per core this keeps the cores busier than one device whose
    small decode matmuls are split across its threads (docs/benchmarks.md, session 5)."""
    rows, rep = PartitionSpec(batch_axes), PartitionSpec()

    def fn(params, cache, tokens_BxP, mask_BxP, key, *, cfg, scfg, group_size, pad_id):
        local = functools.partial(_generate, cfg=cfg, scfg=scfg, group_size=group_size,
                                  pad_id=pad_id, batch_axes=batch_axes)
        return jax.shard_map(local, mesh=mesh, in_specs=(rep, rows, rows, rows, rep),
                             out_specs=(rows, rows), check_vma=False)(
            params, cache, tokens_BxP, mask_BxP, key)

    return fn


def _split_shardings(params_sharding, num_layers: int):
    """The shardings of `split_layers(params)`: each layer's weight without the layers axis."""
    layer = jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])),
                         params_sharding["layers"])
    return {**params_sharding, "layers": (layer,) * num_layers}


class Sampler:
    """Holds the compiled decode program and the donated KV-cache buffer for one model config.

        sampler = Sampler(cfg, SamplerConfig(max_new_tokens=64, temperature=1.0, stop_ids=(2,)))
        out = sampler(params, tokens_BxP, mask_BxP, key, group_size=8)

    With `mesh`, the params may come in any layout (e.g. the trainer's FSDP one, or one device's
    arrays): they are resharded by `rules` (default `SAMPLE_RULES`) for each call; prompts, cache
    and results are split over the rules' "batch" mesh axes (a dim they do not divide stays
    replicated). When the rules replicate every weight (pure data parallelism) and the prompts
    divide over the batch shards, each shard decodes as its own program (`_generate_per_shard`),
    with the same tokens as one device.

    `feature_major` (default: on the CPU, when every device holds all the weights) samples from
    `model.decode_layout(params)`, made once per set of weights and kept while the same params
    come back (`fm_prefill`, `fm_grouped_decode`: the same tokens, log-probs within float
    rounding). `weights_from=other` shares `other`'s kept copy (samplers of the same model and
    mesh under other settings, e.g. an evaluation's k-samples and greedy ones): one copy, made
    once.
    """

    def __init__(self, cfg: ModelConfig, scfg: SamplerConfig, *, pad_id: int = 0,
                 cache_dtype: str | None = None, mesh=None, rules: Rules = sharding.SAMPLE_RULES,
                 feature_major: bool | None = None, weights_from: Sampler | None = None):
        self.cfg, self.scfg, self.pad_id, self.cache_dtype = cfg, scfg, pad_id, cache_dtype
        self.mesh, self.rules = mesh, rules
        self._cache: Cache | None = None
        # [(weakrefs to the params' leaves, their layout) or None], shared with `weights_from`
        self._held: list = [None]
        fn, self._split, self.shards, per_shard, self._share = _generate, _split, 1, None, False
        static = ("cfg", "scfg", "group_size", "pad_id")
        if mesh is not None:
            fn = _generate_under(mesh, rules)
            self._params_sharding = params_sharding = sharding.param_shardings(cfg, mesh, rules)
            self._split_sharding = _split_shardings(params_sharding, cfg.num_layers)
            self._split = jax.jit(split_layers, out_shardings=self._split_sharding)
            batch_axes = sharding.batch_sharding(mesh, rules).spec[0]
            replicated = all(s.is_fully_replicated for s in jax.tree.leaves(
                params_sharding, is_leaf=lambda x: isinstance(x, NamedSharding)))
            self.shards = sharding.batch_parallelism(mesh, rules)
            if replicated and self.shards > 1:
                per_shard = _generate_per_shard(mesh, batch_axes)
            # Weights on one CPU device are shared by all (views of its buffers: no copy).
            self._share = replicated and sharding.host_shared(mesh)
        if feature_major is None:
            feature_major = self._share if mesh is not None else jax.default_backend() == "cpu"
        elif feature_major and mesh is not None and not replicated:
            raise ValueError("feature_major=True needs every weight replicated on the mesh (rules "
                             "without weight sharding, e.g. sharding.SAMPLE_RULES with a data-only "
                             "mesh); pass feature_major=None or False")
        self.feature_major = feature_major
        if weights_from is not None:
            same = (weights_from.cfg, weights_from.mesh, weights_from.rules,
                    weights_from.feature_major) == (cfg, mesh, rules, feature_major)
            if not same:
                raise ValueError("weights_from: that sampler decodes another model config, mesh, "
                                 "rules or layout; it can share its weights only with a sampler "
                                 "of the same ones")
            self._held = weights_from._held
        # The cache is donated: XLA writes into the same buffer, which we get back and keep.
        self._fn = jax.jit(fn, static_argnames=static, donate_argnames=("cache",))
        self._per_shard = per_shard and jax.jit(per_shard, static_argnames=static,
                                                donate_argnames=("cache",))

    def _buffer(self, rows: int, length: int) -> Cache:
        c = self._cache
        if not cache_fits(c, rows, length):
            make = functools.partial(init_cache, self.cfg, rows, length, self.cache_dtype)
            if self.mesh is None:
                c = make()
            else:  # created in place, each device holding only its own slice
                shape = (rows, self.cfg.num_kv_heads, length, self.cfg.hd)
                c = sharding.init_sharded(make, sharding.activation_sharding(
                    self.mesh, self.rules, shape, CACHE_AXES))
        self._cache = None
        return c

    def __call__(self, params: Params, tokens_BxP, mask_BxP, key: jax.Array, *,
                 group_size: int = 1) -> Samples:
        if key is None:
            raise ValueError("a PRNG key is required: pass jax.random.key(seed) folded with the step")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        tokens_BxP, mask_BxP = np.asarray(tokens_BxP, np.int32), np.asarray(mask_BxP, bool)
        b, p = tokens_BxP.shape
        cache = self._buffer(b * group_size, self.scfg.max_new_tokens)
        fn, split = self._fn, None
        if self.feature_major:
            split = self._decode_weights(params)
        if self.mesh is not None:
            sets = {frozenset(x.devices()) if isinstance(x, jax.Array) else None
                    for x in jax.tree.leaves(params)} if split is None else None
            if sets is not None and sets != {frozenset(self.mesh.devices.flat)}:
                # e.g. a trainer's params on one device
                (source,) = sets if len(sets) == 1 else (None,)
                one_cpu = bool(source) and len(source) == 1 and next(iter(source)).platform == "cpu"
                if self._share and one_cpu:  # each layer's weights: a view into the stack
                    host = jax.tree.map(np.asarray, params)  # no copy on the CPU backend
                    split = sharding.share_replicated(split_layers(host), self._split_sharding)
                else:
                    params = jax.device_put(params, self._params_sharding)
            if self._per_shard is not None and b % self.shards == 0:
                fn = self._per_shard
            prompt_sharding = sharding.activation_sharding(self.mesh, self.rules, (b, p),
                                                           ("batch", None))
            tokens_BxP, mask_BxP = sharding.place((tokens_BxP, mask_BxP), prompt_sharding)
        # Per-layer weights as separate arguments: sliced inside the program, XLA would copy every
        # layer's weights at every decode step.
        if split is None:
            split = self._split(params)
        out, self._cache = fn(split, cache, tokens_BxP, mask_BxP, key,
                              cfg=self.cfg, scfg=self.scfg, group_size=group_size, pad_id=self.pad_id)
        return out

    @property
    def _kept(self) -> tuple[list, Params] | None:
        return self._held[0]

    @_kept.setter
    def _kept(self, value) -> None:
        self._held[0] = value

    def _decode_weights(self, params: Params) -> Params:
        """`decode_layout(params)` (on a mesh: every device's copy a view of one buffer), made
        again only when `params` are not the arrays of the last call: the layout is a copy, so
        the caller may donate or delete its params meanwhile (weak references tell)."""
        leaves = jax.tree.leaves(params)
        if self._kept is not None:
            refs, kept = self._kept
            if len(refs) == len(leaves) and all(r() is x and not x.is_deleted()
                                                for r, x in zip(refs, leaves)):
                return kept
        self._kept = None  # free the old copy before making the new one
        on_mesh = self.mesh is not None
        if on_mesh and any(not isinstance(x, jax.Array) or len(x.devices()) != 1 for x in leaves):
            params = jax.device_put(params, self.mesh.devices.flat[0])  # one device's copy
        layout = _decode_layout(params, self.cfg)
        if on_mesh:
            rep = NamedSharding(self.mesh, PartitionSpec())
            layout = sharding.share_replicated(layout, jax.tree.map(lambda _: rep, layout))
        if all(isinstance(x, jax.Array) for x in leaves):  # numpy arrays may change in place
            self._kept = ([weakref.ref(x) for x in leaves], layout)
        return layout

    def forget_weights(self) -> None:
        """Drop the kept `decode_layout` copy (a trainer calls this after its rollout: the params
        change in the update, so the copy would only hold memory until the next rollout)."""
        self._kept = None

    def cache_size(self) -> int:
        """Number of compiled variants (a test checks that equal buckets do not recompile)."""
        return self._fn._cache_size() + (self._per_shard._cache_size() if self._per_shard else 0)


def generate(params: Params, cfg: ModelConfig, scfg: SamplerConfig, prompts: Sequence[Sequence[int]],
             key: jax.Array, *, group_size: int = 1, pad_id: int = 0) -> Samples:
    """One-off convenience: pad token lists to the bucket and sample (builds a new `Sampler`)."""
    tokens, mask = pad_prompts(prompts, bucket=scfg.prompt_bucket, pad_id=pad_id)
    return Sampler(cfg, scfg, pad_id=pad_id)(params, tokens, mask, key, group_size=group_size)
