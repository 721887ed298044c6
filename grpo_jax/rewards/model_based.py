"""Model-based rewards (SPEC sections 3 and 4, R1 stage 5): a judge LM and a scalar reward model,
both run through our own model code and registered by name beside the rule-based rewards.

- Judge (``kind="judge"``): a causal LM reads a judging prompt built from a template with
  ``{question}`` and ``{response}`` and the reward is its verdict at the next token,

      r = p(yes) / (p(yes) + p(no)),   p(yes) = sum over the yes_tokens of p(token | judge prompt)

  in [0, 1] (or the log-odds log p(yes) - log p(no) with ``output="logodds"``).
- Reward model (``kind="reward_model"``): a Hugging Face ``*ForSequenceClassification`` checkpoint
  with ``num_labels=1`` (e.g. trained with TRL's RewardTrainer); the reward is the score head
  applied to the final hidden state of the row's last non-pad token, as in ``transformers``.

Both take decoded text like every reward (``fn(prompts, completions, **fields)``) and tokenize it
with the scoring model's own tokenizer, truncating from the left to ``max_len`` (counted and
logged). The question is the example's ``question`` field when the trainer passes one (the raw
problem, without the policy's prompt template), else the prompt text. Rows are sorted by length,
cut into batches of at most ``batch_size``, left-padded to a multiple of ``length_bucket`` and
to a power-of-two number of rows, and run through one jitted program per (rows, length) bucket:
the weights are loaded once, and repeated shapes never recompile. A fixed ``scale`` / ``shift``
maps the raw value v to ``scale * v + shift``.

Declaring one in an experiment file (``runner.load_experiment`` executes the file, so a
module-level call registers the reward before the trainer looks its name up)::

    from grpo_jax.rewards.model_based import register_model_reward

    register_model_reward("helpful", kind="judge", path="Qwen/Qwen2.5-1.5B-Instruct",
                          chat_template=True, response="after_think")
    register_model_reward("rm", kind="reward_model", path="/models/my-qwen2-rm")

    CONFIG = Experiment(..., rewards=RewardConfig(
        weights=(("accuracy", 1.0), ("format", 0.3), ("helpful", 0.5))))

The weights are loaded on the first call (``lazy=True``, the default), so tools that only read the
experiment file (sweeps, listing, tests) stay fast; ``lazy=False`` loads at registration. The
scoring model runs on the default device beside the policy (its memory adds to the policy's).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import hf_io
from grpo_jax import model as M
from grpo_jax.config import ModelConfig
from grpo_jax.rewards import REWARDS, register_reward
from grpo_jax.sampler import pad_prompts

log = logging.getLogger(__name__)

Kind = Literal["judge", "reward_model"]

DEFAULT_JUDGE_TEMPLATE = (
    "Below are a user's request and an assistant's response.\n\n"
    "[Request]\n{question}\n\n[Response]\n{response}\n\n"
    "Is the response helpful, correct and harmless? Reply with Yes or No.\n"
)
_FIELDS = re.compile(r"\{(question|response)\}")

# Traces of each jitted program (one per new shape or config): tests and users check with it that
# repeated calls do not recompile.
TRACES: collections.Counter[str] = collections.Counter()


# ----------------------------------------------------------------------------- pure functions


def _last_index(mask_NxL: jax.Array) -> jax.Array:
    """Index of the last True of each row (0 for an all-False row, as `transformers` gives)."""
    l = mask_NxL.shape[1]
    return jnp.argmax(jnp.arange(l, dtype=jnp.int32) * mask_NxL.astype(jnp.int32), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def judge_logodds(params: M.Params, cfg: ModelConfig, tokens_NxL, mask_NxL, yes_ids, no_ids):
    """log sum_{y in yes_ids} p(y) - log sum_{n in no_ids} p(n) [N] float32: the judge's
    next-token distribution after each row's last real token (left or right padding). Jitted;
    `cfg` is static, the token ids are arrays (changing them does not recompile)."""
    TRACES["judge"] += 1
    tokens_NxL = jnp.asarray(tokens_NxL, jnp.int32)
    mask_NxL = jnp.asarray(mask_NxL).astype(bool)
    with jax.named_scope("judge"):
        h_NxLxD = M.hidden(params, tokens_NxL, cfg, mask_NxL)
        h_Nx1xD = jnp.take_along_axis(h_NxLxD, _last_index(mask_NxL)[:, None, None], axis=1)
        logp_NxV = jax.nn.log_softmax(M.unembed(params, h_Nx1xD, cfg)[:, 0], axis=-1)
        yes = jax.nn.logsumexp(logp_NxV[:, jnp.asarray(yes_ids)], axis=-1)
        no = jax.nn.logsumexp(logp_NxV[:, jnp.asarray(no_ids)], axis=-1)
    return yes - no


@functools.partial(jax.jit, static_argnames=("cfg", "pad_token_id"))
def reward_model_scores(params: M.Params, head_DxC, cfg: ModelConfig, tokens_NxL, mask_NxL,
                        pad_token_id: int | None = None) -> jax.Array:
    """Scalar reward-model scores [N] float32: the score head (C = 1) on the final hidden state of
    each row's last real token. Jitted; `cfg` and `pad_token_id` are static.

    Pooling matches `transformers`' `*ForSequenceClassification`: with a `pad_token_id` (the
    checkpoint's config), the row's rightmost token that is not `pad_token_id`, so a real token
    equal to the pad id is skipped as transformers skips it; without one, the last real token.
    `mask_NxL` marks real tokens; positions count them only, so left padding gives the scores
    that transformers gives the same rows right-padded."""
    TRACES["reward_model"] += 1
    if head_DxC.ndim != 2 or head_DxC.shape[1] != 1:
        raise ValueError(f"a scalar reward model has a [D, 1] score head, got {head_DxC.shape}")
    tokens_NxL = jnp.asarray(tokens_NxL, jnp.int32)
    mask_NxL = jnp.asarray(mask_NxL).astype(bool)
    with jax.named_scope("reward_model"):
        h_NxLxD = M.hidden(params, tokens_NxL, cfg, mask_NxL)
        keep = mask_NxL if pad_token_id is None else mask_NxL & (tokens_NxL != pad_token_id)
        h_NxD = jnp.take_along_axis(h_NxLxD, _last_index(keep)[:, None, None], axis=1)[:, 0]
        cd = M.DTYPES[cfg.compute_dtype]
        return jnp.einsum("nd,dc->nc", h_NxD.astype(cd), head_DxC.astype(cd),
                          preferred_element_type=jnp.float32)[:, 0]


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class ScoringModel:
    """A loaded judge or reward model: weights on the default device and its tokenizer.
    `head_DxC` and `pad_token_id` are the classifier's (None for a judge)."""

    cfg: ModelConfig
    params: M.Params
    tokenizer: Any
    head_DxC: jax.Array | None = None
    pad_token_id: int | None = None


@functools.lru_cache(maxsize=None)
def load_judge(path: str, param_dtype: str | None = None,
               compute_dtype: str | None = None) -> ScoringModel:
    """A causal LM as a judge (cached: several rewards on one judge share its weights)."""
    cfg, params = hf_io.load(path, param_dtype=param_dtype, compute_dtype=compute_dtype)
    tok = hf_io.load_tokenizer(path, vocab_size=cfg.vocab_size)
    return ScoringModel(cfg=cfg, params=jax.device_put(params), tokenizer=tok)


@functools.lru_cache(maxsize=None)
def load_reward_model(path: str, param_dtype: str | None = None,
                      compute_dtype: str | None = None) -> ScoringModel:
    """A `*ForSequenceClassification` checkpoint with num_labels = 1 (cached)."""
    cfg, params, head, hf = hf_io.load_sequence_classifier(path, param_dtype=param_dtype,
                                                           compute_dtype=compute_dtype)
    if head.shape[1] != 1:
        raise hf_io.CheckpointError(f"{path}: a reward model has num_labels=1, this classifier has "
                                    f"{head.shape[1]} labels")
    pad = hf.get("pad_token_id")
    if pad is None and isinstance(hf.get("text_config"), dict):
        pad = hf["text_config"].get("pad_token_id")
    tok = hf_io.load_tokenizer(path, vocab_size=cfg.vocab_size)
    return ScoringModel(cfg=cfg, params=jax.device_put(params), tokenizer=tok,
                        head_DxC=jax.device_put(head), pad_token_id=pad)


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelRewardSpec:
    """Options shared by the judge and the reward model.

    path            Hugging Face directory or hub id of the scoring model
    prompt_template judging text with {question} and {response}; with `chat_template`, the judge's
                    user message (the reward model ignores it then: user = question, assistant =
                    response)
    chat_template   render through the tokenizer's chat template
    chat_template_args  extra keyword arguments of `apply_chat_template`, as (name, value) pairs
                    (a dict is accepted), e.g. {"enable_thinking": False} for a Qwen3 judge
    question_field  the per-example field that holds the question (the trainer passes
                    `question`); None or absent: the prompt text the policy saw
    response        "full" completion, or "after_think": the text after the last </think> (R1
                    judges helpfulness on the final summary only)
    batch_size      most rows per forward (row counts are bucketed to powers of two up to it)
    max_len         longest input in tokens; longer ones lose their first tokens (counted, logged)
    length_bucket   padded lengths are multiples of it (fewer shapes, fewer compiles)
    scale, shift    reward = scale * value + shift
    """

    path: str
    prompt_template: str = "{question}\n{response}"
    chat_template: bool = False
    chat_template_args: tuple[tuple[str, Any], ...] = ()
    question_field: str | None = "question"
    response: Literal["full", "after_think"] = "full"
    batch_size: int = 16
    max_len: int = 2048
    length_bucket: int = 64
    scale: float = 1.0
    shift: float = 0.0
    param_dtype: str | None = None
    compute_dtype: str | None = None

    def __post_init__(self):
        if "{response}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{response}}, got {self.prompt_template!r}")
        if self.response not in ("full", "after_think"):
            raise ValueError(f"response must be 'full' or 'after_think', got {self.response!r}")
        for name in ("batch_size", "max_len", "length_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in (None, *M.DTYPES):
                raise ValueError(f"{name} must be None or one of {sorted(M.DTYPES)}, "
                                 f"got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeSpec(ModelRewardSpec):
    """A judge: also the verdict tokens (each must be one token of the judge's tokenizer; several
    yes tokens add their probabilities, e.g. ("Yes", " Yes")) and the output, "prob" =
    p(yes) / (p(yes) + p(no)) in [0, 1] or "logodds" = log p(yes) - log p(no)."""

    prompt_template: str = DEFAULT_JUDGE_TEMPLATE
    yes_tokens: tuple[str, ...] = ("Yes",)
    no_tokens: tuple[str, ...] = ("No",)
    output: Literal["prob", "logodds"] = "prob"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.yes_tokens, str) or isinstance(self.no_tokens, str):
            raise ValueError("yes_tokens and no_tokens are tuples of strings, e.g. ('Yes',)")
        if not self.yes_tokens or not self.no_tokens:
            raise ValueError("yes_tokens and no_tokens need at least one token each")
        if self.output not in ("prob", "logodds"):
            raise ValueError(f"output must be 'prob' or 'logodds', got {self.output!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelSpec(ModelRewardSpec):
    """A scalar reward model; by default the conversation in the tokenizer's chat template."""

    chat_template: bool = True


# ----------------------------------------------------------------------------- rewards


class ModelReward:
    """A model-based reward, callable as ``fn(prompts, completions, **fields) -> list[float]``.

    `truncated` counts the inputs cut to `max_len` since creation, `rows` the inputs scored."""

    kind: Kind

    def __init__(self, spec: ModelRewardSpec, *, lazy: bool = True):
        self.spec = spec
        self.truncated = 0
        self.rows = 0
        self._model: ScoringModel | None = None
        self._load_error: Exception | None = None
        if lazy:
            _check_local(spec.path)
        else:
            self.load()

    def __repr__(self) -> str:  # the registry compares reprs to catch a name registered twice
        return f"{type(self).__name__}({self.spec!r})"

    @property
    def model(self) -> ScoringModel:
        return self.load()

    def load(self) -> ScoringModel:
        """The scoring model, loaded on first use. A failed load is remembered and raised again
        at once: the failure policy of `score_completions` retries a failing reward example by
        example, and N reloads of a large model would stall the step."""
        if self._model is None:
            if self._load_error is not None:
                raise RuntimeError(f"{self}: the model failed to load earlier "
                                   f"({self._load_error})") from self._load_error
            try:
                m = self._load()
                self._prepare(m)
            except Exception as e:
                self._load_error = e
                log.error("%s: loading the scoring model failed: %s: %s", self, type(e).__name__, e)
                raise
            self._model = m
        return self._model

    # subclasses
    def _load(self) -> ScoringModel:
        raise NotImplementedError

    def _prepare(self, m: ScoringModel) -> None:
        pass

    def _score(self, m: ScoringModel, tokens_NxL: np.ndarray, mask_NxL: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _finish(self, raw_N: np.ndarray) -> np.ndarray:
        return raw_N

    # text -> tokens -> scores
    def texts(self, prompts: Sequence[str], completions: Sequence[str],
              fields: dict[str, Sequence[Any]]) -> list[str]:
        """The scoring model's input text for each (prompt, completion)."""
        s, tok = self.spec, self.model.tokenizer
        qf = s.question_field
        questions = fields[qf] if qf is not None and qf in fields else prompts
        out = []
        for p, q, r in zip(prompts, questions, completions):
            q, r = str(p if q is None else q), _response_part(r, s.response)
            if s.chat_template:
                if not getattr(tok, "chat_template", None):
                    raise ValueError(f"{s.path}: the tokenizer has no chat template; pass "
                                     "chat_template=False and a prompt_template")
                out.append(self._chat(tok, q, r))
            else:
                out.append(_fill(s.prompt_template, q, r))
        return out

    def _chat(self, tok, question: str, response: str) -> str:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids, left-truncated to `max_len` (counted in `truncated`, logged)."""
        s, tok = self.spec, self.model.tokenizer
        ids = tok(list(texts), add_special_tokens=not s.chat_template)["input_ids"]
        long = [len(x) for x in ids if len(x) > s.max_len]
        if long:
            self.truncated += len(long)
            log.warning("%s: %d of %d inputs were longer than max_len=%d tokens (longest %d) and "
                        "lost their first tokens; %d truncated so far. Raise max_len if the judged "
                        "text matters there.", self, len(long), len(ids), s.max_len, max(long),
                        self.truncated)
        return [list(x[-s.max_len:]) for x in ids]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return []
        m, s = self.model, self.spec
        ids = self.encode(self.texts(prompts, completions, fields))
        pad_id = m.tokenizer.pad_token_id if m.pad_token_id is None else m.pad_token_id
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch together
        raw = np.zeros(len(ids), np.float64)
        for start in range(0, len(order), s.batch_size):
            chunk = order[start:start + s.batch_size]
            tokens, mask = pad_prompts([ids[i] for i in chunk], bucket=s.length_bucket,
                                       pad_id=pad_id if pad_id is not None else 0)
            rows = min(s.batch_size, 1 << (len(chunk) - 1).bit_length())
            if rows > len(chunk):  # filler rows: copies of the first, scored and dropped
                fill = rows - len(chunk)
                tokens = np.concatenate([tokens, np.repeat(tokens[:1], fill, 0)])
                mask = np.concatenate([mask, np.repeat(mask[:1], fill, 0)])
            raw[chunk] = np.asarray(self._score(m, tokens, mask), np.float64)[:len(chunk)]
        self.rows += len(ids)
        return [float(v) for v in s.scale * self._finish(raw) + s.shift]


class JudgeReward(ModelReward):
    """p(yes) / (p(yes) + p(no)) of a causal-LM judge (or its log-odds); see the module doc."""

    kind = "judge"
    spec: JudgeSpec

    def _load(self) -> ScoringModel:
        return load_judge(self.spec.path, self.spec.param_dtype, self.spec.compute_dtype)

    def _prepare(self, m: ScoringModel) -> None:
        self.yes_ids = _single_token_ids(m.tokenizer, self.spec.yes_tokens, "yes_tokens")
        self.no_ids = _single_token_ids(m.tokenizer, self.spec.no_tokens, "no_tokens")
        both = set(self.yes_ids) & set(self.no_ids)
        if both:
            raise ValueError(f"{self.spec.path}: token ids {sorted(both)} are both yes and no tokens")

    def _chat(self, tok, question: str, response: str) -> str:
        msg = [{"role": "user", "content": _fill(self.spec.prompt_template, question, response)}]
        return tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True,
                                       **dict(self.spec.chat_template_args))

    def _score(self, m, tokens_NxL, mask_NxL):
        return judge_logodds(m.params, m.cfg, tokens_NxL, mask_NxL, np.asarray(self.yes_ids),
                              np.asarray(self.no_ids))

    def _finish(self, raw_N):
        return raw_N if self.spec.output == "logodds" else 1.0 / (1.0 + np.exp(-raw_N))


class RewardModelReward(ModelReward):
    """The scalar score of a sequence-classification reward model; see the module doc."""

    kind = "reward_model"
    spec: RewardModelSpec

    def _load(self) -> ScoringModel:
        return load_reward_model(self.spec.path, self.spec.param_dtype, self.spec.compute_dtype)

    def _chat(self, tok, question: str, response: str) -> str:
        msg = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        return tok.apply_chat_template(msg, tokenize=False, **dict(self.spec.chat_template_args))

    def _score(self, m, tokens_NxL, mask_NxL):
        return reward_model_scores(m.params, m.head_DxC, m.cfg, tokens_NxL, mask_NxL,
                                   m.pad_token_id)


def make_judge_reward(path: str | Path, *, lazy: bool = True, **options) -> JudgeReward:
    """An unregistered judge reward; `options` are the fields of `JudgeSpec`."""
    return JudgeReward(JudgeSpec(path=str(path), **_tuples(options)), lazy=lazy)


def make_reward_model_reward(path: str | Path, *, lazy: bool = True,
                             **options) -> RewardModelReward:
    """An unregistered reward-model reward; `options` are the fields of `RewardModelSpec`."""
    return RewardModelReward(RewardModelSpec(path=str(path), **_tuples(options)), lazy=lazy)


def register_model_reward(name: str, kind: Kind = "judge", *, path: str | Path,
                          overwrite: bool = False, lazy: bool = True, **options) -> ModelReward:
    """Build a model-based reward and register it under `name`, so that `RewardConfig(weights=
    ((name, w), ...))` scores with it. Registering the same name again with the same options
    returns the registered reward (an experiment file may be executed more than once); other
    options under a taken name are an error unless `overwrite=True`."""
    if kind == "judge":
        reward: ModelReward = make_judge_reward(path, lazy=True, **options)
    elif kind == "reward_model":
        reward = make_reward_model_reward(path, lazy=True, **options)
    else:
        raise ValueError(f"kind must be 'judge' or 'reward_model', got {kind!r}")
    old = REWARDS.get(name)
    if isinstance(old, ModelReward) and type(old) is type(reward) and old.spec == reward.spec:
        reward = old
    else:
        register_reward(name, overwrite=overwrite)(reward)
    if not lazy:
        reward.load()
    return reward


def model_reward_specs() -> dict[str, dict[str, Any]]:
    """{name: {"kind": ..., options}} of every registered model-based reward, for run logs (the
    experiment config names the reward only)."""
    return {name: {"kind": fn.kind, **dataclasses.asdict(fn.spec)}
            for name, fn in REWARDS.items() if isinstance(fn, ModelReward)}


# ----------------------------------------------------------------------------- helpers


def _fill(template: str, question: str, response: str) -> str:
    """One pass over the template, so braces inside the texts are never substituted again."""
    values = {"question": question, "response": response}
    return _FIELDS.sub(lambda m: values[m.group(1)], template)


def _response_part(completion: str, part: str) -> str:
    if part == "after_think" and "</think>" in completion:
        return completion.rsplit("</think>", 1)[1].strip()
    return completion


def _single_token_ids(tok, strings: Sequence[str], what: str) -> list[int]:
    ids = []
    for s in strings:
        enc = tok(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            pieces = tok.convert_ids_to_tokens(enc)
            raise ValueError(f"{what}: {s!r} is {len(enc)} tokens {pieces} in the judge's "
                             "tokenizer; each verdict token must be exactly one token")
        ids.append(enc[0])
    return ids


def _tuples(options: dict) -> dict:
    """Lists and dicts given for tuple options become tuples (the spec is frozen and hashable)."""
    out = dict(options)
    for k in ("yes_tokens", "no_tokens"):
        if isinstance(out.get(k), list):
            out[k] = tuple(out[k])
    if isinstance(out.get("chat_template_args"), dict):
        out["chat_template_args"] = tuple(sorted(out["chat_template_args"].items()))
    return out


def _check_local(path: str) -> None:
    """Fail at registration, not at the first step, for a local directory that cannot be read."""
    d = Path(path).expanduser()
    if not d.is_dir():
        if d.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
            hf_io.resolve(path)  # not a hub id either: raises its message
        return  # a hub id: resolved (downloaded) on the first call
    if not (d / "config.json").exists():
        raise hf_io.CheckpointError(f"{d}: config.json is missing; a model-based reward needs a "
                                    "Hugging Face model directory")
    hf_io.config_from_hf(json.loads((d / "config.json").read_text()))
