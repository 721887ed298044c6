"""Supervised fine-tuning on (prompt, completion) pairs: the R1 recipe's cold start and
post-rejection-sampling SFT (SPEC.md section 4, stages 2 and 4), the SFT core that distillation
(`distill.py`, stage 6) builds on, and the tiny experiments' stand-in pretraining (`train_sft`).

`train_sft_dataset` runs epochs over a fixed dataset. Examples are grouped into length buckets
(or packed several to a row, `packing="pack"`) so that padding does not dominate and only a few
shapes are ever compiled; the loss is the token mean of the completion tokens' negative
log-likelihood over the whole batch (prompt tokens are context only, unless `prompt_loss`).

Shapes: N rows, L row length, T = L - 1 next-token targets, D hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import model
from grpo_jax.config import ModelConfig, OptimConfig, _check, _check_choice
from grpo_jax.optim import make_optimizer

Pairs = Sequence[tuple[str, str]]


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Epochs of supervised fine-tuning over a fixed set of (prompt, completion) pairs.

    `batch_size` counts rows per optimizer update, not tokens: sequences with
    `packing="bucket"`, rows of `max_len` tokens holding several examples with `packing="pack"`.
    Fixed rows keep the shapes few (a row count and a handful of lengths); the loss is a token
    mean, so a batch's weight in an update does not depend on how full its rows are.

    packing:
      "bucket": examples are grouped by length into at most `num_buckets` lengths (multiples
        of `pad_multiple`, chosen to minimize padding on this dataset); each epoch shuffles the
        examples within their bucket and the order of the batches. At most `num_buckets` compiles.
      "pack":   examples are packed first-fit into rows of `max_len` tokens; attention is
        block-diagonal causal and positions restart at 0 per example, so an example's loss is
        the same as alone in its row (tested). One compile.

    The paper's rejection-sampling SFT runs 2 epochs (DeepSeek-R1, section 2.3.3).
    """

    epochs: int = 2
    batch_size: int = 32
    max_len: int = 2048  # prompt + completion + EOS; longer examples lose their tail (counted)
    optim: OptimConfig = OptimConfig(lr=1e-5, schedule="cosine")  # steps = optimizer updates
    prompt_loss: bool = False  # False: only completion tokens (and the EOS) are targets
    packing: Literal["bucket", "pack"] = "bucket"
    num_buckets: int = 4  # "bucket": most distinct row lengths (= compiled shapes)
    pad_multiple: int = 16  # row lengths are multiples of this (or max_len)
    heldout_fraction: float = 0.0  # of the pairs, held out for evaluation (0 = none)
    eval_every: int = 0  # held-out loss every this many updates; 0 = before and after only
    seed: int = 0  # held-out split and epoch order

    def __post_init__(self):
        _check(self.epochs >= 1, "sft.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_len >= 2, "sft.max_len", f"must be >= 2, got {self.max_len}")
        _check_choice(self.packing, "sft.packing", ("bucket", "pack"))
        _check(self.num_buckets >= 1, "sft.num_buckets", f"must be >= 1, got {self.num_buckets}")
        _check(self.pad_multiple >= 1, "sft.pad_multiple", f"must be >= 1, got {self.pad_multiple}")
        _check(0 <= self.heldout_fraction < 1, "sft.heldout_fraction",
               f"must be in [0, 1), got {self.heldout_fraction}")
        _check(self.eval_every >= 0, "sft.eval_every",
               f"must be >= 0 (0 = start and end), got {self.eval_every}")
        _check(self.batch_size % self.optim.micro_batches == 0, "sft.batch_size",
               f"= {self.batch_size} must be a multiple of optim.micro_batches "
               f"({self.optim.micro_batches})")


@dataclasses.dataclass
class SFTResult:
    """`losses[i]` is the training loss of update i + 1; `heldout` holds (updates done, loss),
    from 0 (before training) to the end. `tokens_seen` counts real (non-pad) tokens fed to
    training updates, `loss_tokens` those that were targets; `padding_fraction` is the share of
    pad positions in the training batches. `shapes` are the distinct (rows, length) compiled."""

    params: dict
    losses: list[float]
    heldout: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    tokens_seen: int = 0
    loss_tokens: int = 0
    padding_fraction: float = 0.0
    truncated: int = 0  # examples longer than max_len (their tail was cut)
    skipped: int = 0  # updates skipped for a non-finite loss or gradient
    shapes: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Resumable:
    """Where `fit` keeps its state so that an interrupted run goes on where it stopped.

    `dir` holds one orbax checkpoint (params, optimizer state, and the record of the updates
    done: losses, held-out losses, token counts). It is written every `every_s` seconds of
    training (0: never on a timer) and when `stop()` turns true after an update; `fit` then raises
    `Stopped`. A later `fit` with the same dir, data and config restores it and runs the remaining
    updates: the epoch plans derive from `SFTConfig.seed`, so the result equals an uninterrupted
    run's (tested)."""

    dir: Path
    every_s: float = 600.0
    stop: Callable[[], bool] | None = None


class Stopped(Exception):
    """`fit` saved its state after update `step` because `Resumable.stop()` asked it to."""

    def __init__(self, step: int):
        super().__init__(f"stopped after update {step}; state saved")
        self.step = step


# ----------------------------------------------------------------------------- data


class Example(NamedTuple):
    ids: np.ndarray  # prompt + completion + EOS, at most max_len
    prompt_len: int


class Batch(NamedTuple):
    """One batch of rows. `segments` numbers the examples in a row from 1 (0 = padding);
    `weights` [N, T] is 1 where target token t + 1 is trained on (a completion token of the same
    example as token t)."""

    tokens_NxL: np.ndarray
    segments_NxL: np.ndarray
    positions_NxL: np.ndarray
    weights_NxT: np.ndarray


def encode_examples(tok, pairs: Pairs, max_len: int) -> tuple[list[Example], int]:
    """Token ids of each pair (the completion ends with EOS) cut at `max_len`; and how many
    were cut."""
    if not pairs:
        return [], 0
    prompts = tok([p for p, _ in pairs], add_special_tokens=False).input_ids
    comps = tok([c for _, c in pairs], add_special_tokens=False).input_ids
    out, cut = [], 0
    for p, c in zip(prompts, comps):
        ids = list(p) + list(c) + [tok.eos_token_id]
        cut += len(ids) > max_len
        out.append(Example(np.asarray(ids[:max_len], np.int32), min(len(p), max_len)))
    return out, cut


def bucket_lengths(lengths: Sequence[int], *, num_buckets: int, multiple: int,
                   max_len: int) -> tuple[int, ...]:
    """At most `num_buckets` row lengths (multiples of `multiple`, capped at `max_len`) that
    cover every length and minimize the total padded length: an exact dynamic program over the
    distinct rounded lengths (a few hundred at most)."""
    rounded = np.minimum(-(-np.asarray(lengths, np.int64) // multiple) * multiple, max_len)
    u, c = np.unique(rounded, return_counts=True)
    m, k = len(u), min(num_buckets, len(u))
    cum = np.concatenate([[0], np.cumsum(c)])
    # best[j, i]: least total length covering u[:i + 1] with j + 1 buckets, the last one u[i].
    best = np.full((k, m), np.inf)
    prev = np.zeros((k, m), np.int64)
    best[0] = u * cum[1:]
    for j in range(1, k):
        for i in range(j, m):
            cands = best[j - 1, j - 1:i] + u[i] * (cum[i + 1] - cum[j:i + 1])
            prev[j, i] = j - 1 + int(np.argmin(cands))
            best[j, i] = cands.min()
    j = int(np.argmin(best[:, m - 1]))
    out, i = [], m - 1
    while True:
        out.append(int(u[i]))
        if j == 0:
            break
        i, j = int(prev[j, i]), j - 1
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    length: int
    rows: tuple[tuple[int, ...], ...]  # example indices per row; () = an empty (padding) row


def plan_epoch(lengths: Sequence[int], scfg: SFTConfig, buckets: tuple[int, ...],
               rng: np.random.Generator | None) -> list[BatchPlan]:
    """One pass over every example, exactly once, as batches of `scfg.batch_size` rows (the
    last batch of a bucket filled with empty rows). `rng=None`: a fixed order (evaluation)."""
    lengths = np.asarray(lengths)
    order = np.arange(len(lengths)) if rng is None else rng.permutation(len(lengths))
    n = scfg.batch_size

    def chunk(rows, length):
        return [BatchPlan(length, tuple(rows[i:i + n]) + ((),) * max(0, i + n - len(rows)))
                for i in range(0, len(rows), n)]

    batches = []
    if scfg.packing == "bucket":
        which = np.searchsorted(np.asarray(buckets), lengths[order])
        for b, length in enumerate(buckets):
            batches += chunk([(int(i),) for i in order[which == b]], length)
    else:
        # First fit over the most recent open rows (a bounded window keeps it linear in N).
        window, rows, free = 64, [], []
        for i in order:
            li = int(lengths[i])
            lo = max(0, len(rows) - window)
            for r in range(lo, len(rows)):
                if free[r] >= li:
                    rows[r].append(int(i))
                    free[r] -= li
                    break
            else:
                rows.append([int(i)])
                free.append(scfg.max_len - li)
        batches = chunk([tuple(r) for r in rows], scfg.max_len)
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def assemble(examples: Sequence[Example], plan: BatchPlan, *, prompt_loss: bool) -> Batch:
    """The padded arrays of one planned batch (right padding, pad id 0 is never attended)."""
    n, l = len(plan.rows), plan.length
    tokens = np.zeros((n, l), np.int32)
    seg = np.zeros((n, l), np.int32)
    pos = np.zeros((n, l), np.int32)
    target = np.zeros((n, l), bool)
    for r, row in enumerate(plan.rows):
        at = 0
        for s, i in enumerate(row, start=1):
            ex = examples[i]
            k = len(ex.ids)
            tokens[r, at:at + k] = ex.ids
            seg[r, at:at + k] = s
            pos[r, at:at + k] = np.arange(k)
            target[r, at + (0 if prompt_loss else ex.prompt_len):at + k] = True
            at += k
    # Token t predicts t + 1; never across examples (the first token of an example has no context).
    w = target[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return Batch(tokens, seg, pos, w.astype(np.float32))


# ----------------------------------------------------------------------------- loss


def batch_hidden(params, cfg: ModelConfig, batch: Batch, *, packed: bool) -> jax.Array:
    """Final hidden states [N, L, D]. Unpacked rows go through `model.hidden` (the policy's own
    path); packed rows through `model.decoder` with a block-diagonal causal mask."""
    tokens = jnp.asarray(batch.tokens_NxL, jnp.int32)
    seg = jnp.asarray(batch.segments_NxL)
    pos = jnp.asarray(batch.positions_NxL)
    l = tokens.shape[1]  # positions count within a row (or a packed segment): below L
    if not packed:
        return model.hidden(params, tokens, cfg, seg > 0, pos, max_pos=l)
    causal = jnp.tril(jnp.ones((l, l), bool))[None]
    allowed = causal & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    h, _ = model.decoder(params, tokens, cfg, positions_BxL=pos, allowed_BxLxS=allowed, max_pos=l)
    return h


def nll_from_hidden(params, cfg: ModelConfig, h_NxLxD, batch: Batch):
    """(sum of the target tokens' negative log-likelihoods, number of targets). Position t's
    hidden state only feeds the logits predicting token t + 1, weighted by `weights[:, t]`."""
    targets = jnp.asarray(batch.tokens_NxL, jnp.int32)[:, 1:]
    logps = model.logprobs_from_hidden(params, h_NxLxD[:, :-1], targets, cfg)
    w = jnp.asarray(batch.weights_NxT, jnp.float32)
    return -jnp.sum(logps * w), jnp.sum(w)


def completion_nll(params, cfg: ModelConfig, batch: Batch, *, packed: bool = False):
    """(sum of NLL over the batch's target tokens, their count): the SFT objective is the token
    mean sum / count, -1/|C| sum_{t in C} log pi(y_t | y_<t), with C the completion tokens of
    every example in the batch (a per-sequence mean would over-weight short completions)."""
    return nll_from_hidden(params, cfg, batch_hidden(params, cfg, batch, packed=packed), batch)


# ----------------------------------------------------------------------------- training loop

# objective(params, batch, *extra) -> (loss summed over target tokens, number of targets)
Objective = Callable[..., tuple[jax.Array, jax.Array]]


def _split_heldout(n: int, scfg: SFTConfig) -> tuple[np.ndarray, np.ndarray]:
    if scfg.heldout_fraction == 0:
        return np.arange(n), np.arange(0)
    k = int(round(scfg.heldout_fraction * n))
    _check(1 <= k < n, "sft.heldout_fraction",
           f"{scfg.heldout_fraction} of {n} pairs leaves {k} held out; need at least 1 on each "
           "side")
    perm = np.random.default_rng([scfg.seed, 1]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def fit(params, cfg: ModelConfig, tok, pairs: Pairs, scfg: SFTConfig, objective: Objective, *,
        extra: tuple = (), heldout_pairs: Pairs | None = None,
        progress: Callable[[int, float], None] | None = None,
        on_eval: Callable[[int, float], None] | None = None,
        resumable: Resumable | None = None) -> SFTResult:
    """The epoch loop shared by SFT and logit distillation: `objective` (summed loss and target
    count, see `completion_nll`) is minimized as a token mean per update; `extra` are further
    non-differentiated arguments (a teacher's params). With `resumable`, the loop saves its state
    and resumes from it (`Resumable`)."""
    if heldout_pairs is not None and scfg.heldout_fraction > 0:
        raise ValueError("sft.heldout_fraction: must be 0 when heldout_pairs are given explicitly, "
                         f"got {scfg.heldout_fraction}")
    examples, cut = encode_examples(tok, list(pairs), scfg.max_len)
    _check(len(examples) > 0, "pairs", "the training set is empty")
    if heldout_pairs is None:
        train_idx, held_idx = _split_heldout(len(examples), scfg)
        held = [examples[i] for i in held_idx]
        examples = [examples[i] for i in train_idx]
    else:
        held, _ = encode_examples(tok, list(heldout_pairs), scfg.max_len)
    lengths = [len(e.ids) for e in examples]
    held_lengths = [len(e.ids) for e in held]
    # One set of row lengths for training and evaluation: the same shapes, fewer compiles.
    buckets = bucket_lengths(lengths + held_lengths, num_buckets=scfg.num_buckets,
                             multiple=scfg.pad_multiple, max_len=scfg.max_len)
    plans = [plan_epoch(lengths, scfg, buckets, np.random.default_rng([scfg.seed, 2, e]))
             for e in range(scfg.epochs)]
    schedule = [p for epoch in plans for p in epoch]
    held_plan = plan_epoch(held_lengths, scfg, buckets, None) if held else []

    tx = make_optimizer(scfg.optim, len(schedule))
    micro = scfg.optim.micro_batches

    def token_mean_grads(params, batch, extra):
        """Summed loss and gradient over micro-batches, divided once by the total target count:
        the exact token mean of the whole batch however its targets fall into micro-batches."""
        grad_fn = jax.value_and_grad(lambda p, b: objective(p, b, *extra), has_aux=True)
        mbs = jax.tree.map(lambda x: x.reshape(micro, -1, *x.shape[1:]), batch)

        def body(acc, mb):
            (s, c), g = grad_fn(params, Batch(*mb))
            return jax.tree.map(jnp.add, acc, (s, c, g)), None

        zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (s, c, g), _ = jax.lax.scan(body, zero, tuple(mbs))
        c = jnp.maximum(c, 1.0)
        return s / c, jax.tree.map(lambda x: x / c, g)

    # Params and optimizer state are donated: updated in place, one copy alive.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, batch, extra):
        loss, grads = token_mean_grads(params, batch, extra)
        ok = jnp.isfinite(loss) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, new_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient skips the update (params and moments unchanged).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return keep(new_params, params), keep(new_state, opt_state), loss, ok

    @jax.jit
    def evaluate(params, batch, extra):
        return objective(params, batch, *extra)

    def heldout_loss(params) -> float:
        s = c = 0.0
        for p in held_plan:
            bs, bc = evaluate(params, assemble(held, p, prompt_loss=scfg.prompt_loss), extra)
            s, c = s + float(bs), c + float(bc)
        return s / max(c, 1.0)

    res = SFTResult(params=None, losses=[], truncated=cut)
    params = jax.tree.map(jnp.array, params)  # own copies: the update donates them
    opt_state = tx.init(params)
    ckpt = state = identity = None
    if resumable is not None:
        # what a saved state must agree with to be resumed: the data and the schedule's length
        identity = {"examples": len(examples), "heldout": len(held), "updates": len(schedule),
                    "data_sha256": _digest(examples + held)}
        ckpt, state = _open_state(resumable.dir, identity)
    if state is not None:
        items, meta = ckpt.restore(state, {"params": params, "opt_state": opt_state})
        params, opt_state = items["params"], items["opt_state"]
        res.losses, res.skipped = meta["losses"], meta["skipped"]
        res.heldout = [tuple(h) for h in meta["heldout"]]
        res.loss_tokens, real, slots = meta["loss_tokens"], meta["real"], meta["slots"]
        shapes = {tuple(x) for x in meta["batch_shapes"]}
    else:
        real = slots = 0
        shapes = set()

    def record_eval(step):
        if held:
            res.heldout.append((step, heldout_loss(params)))
            if on_eval is not None:
                on_eval(*res.heldout[-1])

    def save(step):
        ckpt.save(step, {"params": params, "opt_state": opt_state}, {
            "identity": identity, "losses": res.losses, "skipped": res.skipped,
            "heldout": res.heldout, "loss_tokens": res.loss_tokens, "real": real, "slots": slots,
            "batch_shapes": sorted(shapes)})

    if state is None:
        record_eval(0)
    done, pending, saved_at = state or 0, None, time.monotonic()
    try:
        for s, p in enumerate(schedule[done:], start=done + 1):
            batch = assemble(examples, p, prompt_loss=scfg.prompt_loss)
            real += int((batch.segments_NxL > 0).sum())
            slots += batch.tokens_NxL.size
            res.loss_tokens += int(batch.weights_NxT.sum())
            shapes.add(batch.tokens_NxL.shape)
            params, opt_state, loss, ok = update(params, opt_state, batch, extra)
            if pending is not None:  # fetch the previous step's loss: the device never waits
                _finish(res, progress, *pending)
            pending = (s, loss, ok)
            if scfg.eval_every and s % scfg.eval_every == 0 and s != len(schedule):
                _finish(res, progress, *pending)
                pending = None
                record_eval(s)
            if resumable is None or s == len(schedule):
                continue
            stop = resumable.stop is not None and resumable.stop()
            if stop or (resumable.every_s and time.monotonic() - saved_at >= resumable.every_s):
                if pending is not None:
                    _finish(res, progress, *pending)
                    pending = None
                save(s)
                saved_at = time.monotonic()
                if stop:
                    ckpt.wait()
                    raise Stopped(s)
        if pending is not None:
            _finish(res, progress, *pending)
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for a save in flight
    record_eval(len(schedule))
    res.params = params
    res.tokens_seen = real
    res.padding_fraction = 1.0 - real / max(slots, 1)
    res.shapes = tuple(sorted(shapes))
    return res


def _digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray([e.prompt_len, e.ids.size], np.int64).tobytes())
        h.update(np.asarray(e.ids, np.int64).tobytes())
    return h.hexdigest()[:16]


def saved_update(root: Path) -> int | None:
    """The update after which `Resumable(root)` saved its state; None when it saved none."""
    from grpo_jax.checkpoints import Checkpointer

    if not Path(root).is_dir():
        return None
    ckpt = Checkpointer(root, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _open_state(root: Path, identity: dict):
    """(Checkpointer over `root`, the step of its saved state or None), refusing a state saved
    for other data or another schedule."""
    from grpo_jax.checkpoints import Checkpointer

    ckpt = Checkpointer(root, keep=1)
    step = ckpt.latest_step()
    if step is not None:
        saved = ckpt.meta(step).get("identity", {})
        diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if diff:
            ckpt.close()
            what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
            raise ValueError(f"{root}: the saved SFT state (update {step}) is of other data or "
                             f"another schedule ({what}); delete that directory to start over")
    return ckpt, step


def _finish(res: SFTResult, progress, step: int, loss, ok) -> None:
    res.losses.append(float(loss))
    res.skipped += not bool(ok)
    if progress is not None:
        progress(step, res.losses[-1])


def train_sft_dataset(params, cfg: ModelConfig, tok, pairs: Pairs, scfg: SFTConfig, *,
                      heldout_pairs: Pairs | None = None,
                      progress: Callable[[int, float], None] | None = None,
                      on_eval: Callable[[int, float], None] | None = None,
                      resumable: Resumable | None = None) -> SFTResult:
    """SFT for `scfg.epochs` epochs over `pairs` (cold start, post-rejection-sampling SFT,
    distillation): minimizes the completion tokens' mean NLL (`completion_nll`). Held-out loss
    (on `heldout_pairs`, or a `scfg.heldout_fraction` split of `pairs`) uses the same loss
    without updates, before training, every `scfg.eval_every` updates and at the end.
    `progress(updates_done, loss)` and `on_eval(updates_done, heldout_loss)` are callbacks;
    `resumable` saves the loop's state and resumes from it (`Resumable`)."""
    packed = scfg.packing == "pack"

    def objective(p, batch):
        return completion_nll(p, cfg, batch, packed=packed)

    return fit(params, cfg, tok, pairs, scfg, objective, heldout_pairs=heldout_pairs,
               progress=progress, on_eval=on_eval, resumable=resumable)


# ----------------------------------------------------------------------------- pretraining path


def encode_pairs(tok, pairs: Sequence[tuple[str, str]], max_len: int, *, prompt_loss: bool,
                 bucket: int = 16):
    """Right-padded tokens, attention mask, and loss mask [N, L] over (prompt, completion) text
    pairs; the completion ends with EOS. L is the longest pair rounded up to `bucket` (few
    distinct shapes, few compiles), at most `max_len`. `prompt_loss=False` masks the prompt."""
    n = len(pairs)
    encoded = [(tok(p, add_special_tokens=False).input_ids,
                tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]) for p, c in pairs]
    longest = max(len(pi) + len(ci) for pi, ci in encoded)
    max_len = min(max_len, -(-longest // bucket) * bucket)
    tokens = np.full((n, max_len), tok.pad_token_id, np.int32)
    attn = np.zeros((n, max_len), bool)
    loss = np.zeros((n, max_len), bool)
    for i, (pi, ci) in enumerate(encoded):
        ids = (pi + ci)[:max_len]
        tokens[i, :len(ids)] = ids
        attn[i, :len(ids)] = True
        loss[i, (0 if prompt_loss else len(pi)):len(ids)] = True
    return tokens, attn, loss


def next_token_loss(params, cfg: ModelConfig, tokens_NxL, attn_NxL, loss_NxL):
    """Mean negative log-likelihood of the loss-masked target tokens."""
    logps = model.token_logprobs(params, tokens_NxL, cfg, attn_NxL)
    w = loss_NxL[:, 1:].astype(jnp.float32)
    return -jnp.sum(logps * w) / jnp.maximum(w.sum(), 1.0)


def train_sft(params, cfg: ModelConfig, tok, sample_batch: Callable[[int], list[tuple[str, str]]], *,
              steps: int, batch_size: int, max_len: int, ocfg: OptimConfig, prompt_loss: bool,
              progress: Callable[[int, float], None] | None = None) -> SFTResult:
    """`steps` AdamW updates on batches from `sample_batch(step)` (deterministic in the step):
    the tiny experiments' pretraining on freshly generated text (no epochs, no held-out set;
    `train_sft_dataset` is the trainer for a fixed dataset). `progress(step, loss)` is 0-based."""
    tx = make_optimizer(ocfg, steps)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, attn, loss_mask):
        loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens, attn, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(jnp.array, params)  # own copies: the step donates them
    opt_state = tx.init(params)
    losses = []
    for s in range(steps):
        batch = encode_pairs(tok, sample_batch(s)[:batch_size], max_len, prompt_loss=prompt_loss)
        params, opt_state, loss = step(params, opt_state, *batch)
        losses.append(float(loss))
        if progress is not None:
            progress(s, losses[-1])
    return SFTResult(params=params, losses=losses)
