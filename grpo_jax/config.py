"""Frozen, keyword-only configuration dataclasses.

Every field is declared here with its meaning; `__post_init__` rejects bad values with a message
that names the field and the allowed range. Derived values are properties, never written back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from grpo_jax.sharding import MeshConfig  # no jax import: configs stay light

DType = Literal["float32", "bfloat16", "float16"]
Arch = Literal["qwen2", "qwen3", "llama"]
SUPPORTED_ARCHS: tuple[str, ...] = ("qwen2", "qwen3", "llama")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


def _check_choice(value, field: str, allowed) -> None:
    _check(value in allowed, field, f"got {value!r}, allowed values are {sorted(allowed)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as `transformers` computes it.

    - "llama3": Llama 3.1's NTK-by-parts rule (`low_freq_factor`, `high_freq_factor`).
    - "linear": every frequency divided by `factor`.
    - "yarn": YaRN (Qwen2.5 / Qwen3 long context): frequencies interpolated between `factor`-scaled
      and unscaled by a linear ramp over the dimensions set by `beta_fast` / `beta_slow`, and cos /
      sin multiplied by `attention_factor` (None: 0.1 ln(factor) + 1, or the `mscale` /
      `mscale_all_dim` ratio when both are given).
    """

    kind: Literal["llama3", "linear", "yarn"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _check_choice(self.kind, "rope_scaling.kind", ("llama3", "linear", "yarn"))
        _check(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
        if self.kind == "llama3":
            _check(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                   f"must exceed low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")
        if self.kind == "yarn":
            _check(self.beta_fast > self.beta_slow, "rope_scaling.beta_fast",
                   f"must exceed beta_slow ({self.beta_slow}), got {self.beta_fast}")
            _check(self.attention_factor is None or self.attention_factor > 0,
                   "rope_scaling.attention_factor",
                   f"must be > 0 or None, got {self.attention_factor}")
        _check(self.original_max_position_embeddings > 0,
               "rope_scaling.original_max_position_embeddings",
               f"must be > 0, got {self.original_max_position_embeddings}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer of the Llama / Qwen2 / Qwen3 family.

    Shapes legend (SPEC.md section 6): D = hidden_size, H = num_heads, K = num_kv_heads,
    Hd = head_dim, F = intermediate_size, V = vocab_size.
    """

    arch: Arch = "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2 / Qwen2.5)
    attention_out_bias: bool = False  # o-projection bias (Llama with attention_bias=True)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    max_position_embeddings: int = 32768
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"  # matmuls; softmax, norms and log-probs stay float32
    remat: bool = False  # rematerialize each layer in the backward pass
    # lax.scan over the layers in training (compile time flat in depth), or unrolled (no stacked
    # per-layer activations and gradients: ~8% faster updates for a 4-layer model on CPU).
    # None: scan from 8 layers up.
    scan_layers: bool | None = None
    logits_chunk: int = 1024  # sequence chunk for log-probs, bounds the live [N, chunk, V] logits

    def __post_init__(self):
        _check_choice(self.arch, "arch", SUPPORTED_ARCHS)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "logits_chunk"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
               f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0, "head_dim",
                   f"is None, so num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        else:
            _check(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                   f"must be an even number >= 2 (RoPE rotates pairs), got {self.head_dim}")
        for name in ("param_dtype", "compute_dtype"):
            _check_choice(getattr(self, name), name, ("float32", "bfloat16", "float16"))

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def use_scan(self) -> bool:
        return self.scan_layers if self.scan_layers is not None else self.num_layers >= 8

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.hd
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_out_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Decoding settings. `temperature == 0` means greedy. top_k = 0 and top_p = 1 disable those
    filters. Log-probs under the temperature-1 policy are always returned beside the sampling ones."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    prompt_bucket: int = 16  # prompt lengths are padded up to a multiple of this: no recompiles
    # The decode reads its generated-token cache in up to this many growing windows (each of at
    # least `sampler.MIN_CACHE_WINDOW` slots): step t attends over the window holding slot t,
    # not over all max_new_tokens slots. Long completions read less memory; each window
    # compiles one more copy of the decode step. 1 turns it off.
    cache_windows: int = 4

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.prompt_bucket >= 1, "prompt_bucket", f"must be >= 1, got {self.prompt_bucket}")
        _check(self.cache_windows >= 1, "cache_windows", f"must be >= 1 (1 = off), got {self.cache_windows}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ----------------------------------------------------------------------------- training

AdvantageNorm = Literal["group_std", "none", "batch_std", "rloo"]
KLEstimator = Literal["k1", "k2", "k3"]
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
ZeroStd = Literal["keep", "drop", "dynamic"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """The GRPO surrogate and its published variants (SPEC.md section 2).

    Paper symbols: G = `group_size`; mu = `mu` (updates per rollout, with stored old log-probs);
    eps = `eps_low` / `eps_high` (PPO clip range; DAPO clip-higher uses eps_high = 0.28);
    beta = `kl_coef` (0: no reference model is built or run).

    - `kl_estimator`: k1 = logp - logp_ref; k2 = 0.5 (logp - logp_ref)^2; k3 = Schulman's
      pi_ref/pi - log(pi_ref/pi) - 1 (DeepSeekMath eq. 4).
    - `adv_norm`: group_std (GRPO, Bessel-corrected std with `std_ddof` and `adv_eps`); none
      (Dr. GRPO: R - group mean); batch_std (TRL scale_rewards="batch"); rloo (leave-one-out).
    - `ratio_level`: token (GRPO) or sequence (GSPO: exp of the mean token log-ratio).
    - `aggregation`: seq_mean_token_mean (GRPO), token_mean (DAPO), seq_mean_token_sum_norm
      (Dr. GRPO: token sum over the constant G * L_max).
    - `mask_truncated`: DAPO overlong filtering (completions without a stop token get no loss).
    - `zero_std`: keep groups whose rewards all agree (their advantage is 0), drop them from the
      loss, or "dynamic" (DAPO): sample `dynamic_oversample` x the prompts and fill the batch
      with groups whose rewards differ first.
    - `overlong_cache`: DAPO soft overlong penalty, 0 up to L_max - cache, then linear to -1
      at L_max (0 = off; L_max is the sampler's max_new_tokens).
    - `ref_refresh_every`: set the reference to the current policy every K steps (DeepSeekMath
      Algorithm 1's outer loop; 0 = never).
    """

    group_size: int = 8
    mu: int = 1
    minibatches: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: KLEstimator = "k3"
    adv_norm: AdvantageNorm = "group_std"
    adv_eps: float = 1e-4
    std_ddof: int = 1
    ratio_level: RatioLevel = "token"
    aggregation: Aggregation = "seq_mean_token_mean"
    mask_truncated: bool = False
    zero_std: ZeroStd = "keep"
    dynamic_oversample: float = 2.0
    overlong_cache: int = 0
    ref_refresh_every: int = 0

    def __post_init__(self):
        _check(self.group_size >= 2, "grpo.group_size", f"must be >= 2 (a group needs a baseline), got {self.group_size}")
        _check(self.mu >= 1, "grpo.mu", f"must be >= 1, got {self.mu}")
        _check(self.minibatches >= 1, "grpo.minibatches", f"must be >= 1, got {self.minibatches}")
        _check(0 <= self.eps_low < 1, "grpo.eps_low", f"must be in [0, 1), got {self.eps_low}")
        _check(self.eps_high >= 0, "grpo.eps_high", f"must be >= 0, got {self.eps_high}")
        _check(self.kl_coef >= 0, "grpo.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check_choice(self.kl_estimator, "grpo.kl_estimator", ("k1", "k2", "k3"))
        _check_choice(self.adv_norm, "grpo.adv_norm", ("group_std", "none", "batch_std", "rloo"))
        _check_choice(self.ratio_level, "grpo.ratio_level", ("token", "sequence"))
        _check_choice(self.aggregation, "grpo.aggregation",
                      ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"))
        _check_choice(self.zero_std, "grpo.zero_std", ("keep", "drop", "dynamic"))
        _check(self.dynamic_oversample >= 1, "grpo.dynamic_oversample",
               f"must be >= 1, got {self.dynamic_oversample}")
        _check(self.overlong_cache >= 0, "grpo.overlong_cache", f"must be >= 0, got {self.overlong_cache}")
        _check(self.ref_refresh_every >= 0, "grpo.ref_refresh_every",
               f"must be >= 0 (0 = never), got {self.ref_refresh_every}")
        _check(self.std_ddof in (0, 1), "grpo.std_ddof", f"must be 0 or 1, got {self.std_ddof}")

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """optax AdamW with linear warm-up then a constant or cosine learning rate, global-norm
    clipping, and gradient accumulation over `micro_batches` per minibatch."""

    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 = no clipping
    micro_batches: int = 1

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check_choice(self.schedule, "optim.schedule", ("constant", "cosine"))
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 = off), got {self.clip_norm}")
        _check(self.micro_batches >= 1, "optim.micro_batches", f"must be >= 1, got {self.micro_batches}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the policy comes from: a Hugging Face directory / hub id (`path`), or a fresh random
    init of `init` (used by the tiny experiments, with the built-in character tokenizer)."""

    path: str | None = None
    init: ModelConfig | None = None
    param_dtype: DType | None = None  # None: the checkpoint's dtype
    compute_dtype: DType | None = None
    remat: bool = False
    logits_chunk: int | None = None  # positions per log-prob chunk (None: the model config's);
    # each chunk holds [rows, logits_chunk, vocab] float32 logits: lower it for large vocabularies

    def __post_init__(self):
        _check((self.path is None) != (self.init is None), "model",
               "set exactly one of model.path (a Hugging Face directory or hub id) and model.init")
        _check(self.logits_chunk is None or self.logits_chunk >= 1, "model.logits_chunk",
               f"must be >= 1 (or None), got {self.logits_chunk}")

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with this source's run-time choices (remat, logits chunk) applied."""
        chunk = {"logits_chunk": self.logits_chunk} if self.logits_chunk is not None else {}
        return dataclasses.replace(cfg, remat=self.remat, **chunk)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The task (see grpo_jax/tasks) and how its questions become prompts."""

    task: str = "arithmetic"
    task_args: str = "{}"  # the task's keyword arguments as a JSON object, e.g. '{"digits": [1, 2]}'
    # r1_zero: DeepSeek-R1's base-model template; chat: the tokenizer's chat template; chat_r1:
    # that with the R1 tag instruction as system message; plain: the question; short: the tiny
    # experiments' "User: q Assistant:".
    template: Literal["r1_zero", "chat", "chat_r1", "plain", "short"] = "r1_zero"
    max_prompt_tokens: int = 512
    # A prompt longer than max_prompt_tokens: "error" stops the run and names the example;
    # "truncate" keeps its last max_prompt_tokens tokens (the template's answer cue survives).
    long_prompts: Literal["error", "truncate"] = "error"
    eval_problems: int = 200

    def __post_init__(self):
        _check_choice(self.template, "data.template", ("r1_zero", "chat", "chat_r1", "plain", "short"))
        try:
            args = json.loads(self.task_args)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.task_args: not a JSON object ({e}): {self.task_args!r}") from None
        _check(isinstance(args, dict), "data.task_args", f"must be a JSON object, got {self.task_args!r}")
        _check_choice(self.long_prompts, "data.long_prompts", ("error", "truncate"))
        _check(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}")
        _check(self.eval_problems >= 1, "data.eval_problems", f"must be >= 1, got {self.eval_problems}")

    @property
    def task_kwargs(self) -> dict:
        return json.loads(self.task_args)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward names (grpo_jax/rewards registry) with their weights; r = sum_i w_i r_i."""

    weights: tuple[tuple[str, float], ...] = (("accuracy", 1.0), ("format", 0.3))
    on_error: Literal["zero", "raise"] = "zero"

    def __post_init__(self):
        _check(len(self.weights) >= 1, "rewards.weights", "needs at least one (name, weight)")
        _check_choice(self.on_error, "rewards.on_error", ("zero", "raise"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation: pass@1 averaged over `samples` completions per problem (R1 uses
    temperature 0.6, top-p 0.95) and greedy accuracy."""

    every: int = 0  # steps between evaluations (0 = only before and after training)
    samples: int = 4  # k: pass@1 is averaged over k samples, cons@k votes over them
    temperature: float = 0.6
    top_p: float = 0.95
    batch_prompts: int = 64
    reward: str = "accuracy"  # the reward that decides correctness (e.g. "countdown")

    def __post_init__(self):
        _check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _check(self.samples >= 1, "eval.samples", f"must be >= 1, got {self.samples}")
        _check(self.batch_prompts >= 1, "eval.batch_prompts", f"must be >= 1, got {self.batch_prompts}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    every: int = 1  # steps between lines of metrics.jsonl / TensorBoard points (the plot has all)
    samples_every: int = 10  # steps between logged decoded completions (0 = never)
    num_samples: int = 4
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        _check(self.every >= 1, "log.every", f"must be >= 1, got {self.every}")
        _check(self.samples_every >= 0, "log.samples_every", f"must be >= 0 (0 = never), got {self.samples_every}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints under RUN_DIR/checkpoints/step_N: parameters, optimizer state, reference
    parameters (when beta > 0) and a JSON record (step, data position, wall time). Everything
    random derives from (seed, step), so these are all a run needs to resume bit for bit. Writes
    are atomic (a temporary directory renamed when complete) and, by default, asynchronous."""

    every: int = 0  # steps between checkpoints (0 = only the final one)
    keep: int = 2  # newest checkpoints kept
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    async_save: bool = True  # write in the background while training goes on

    def __post_init__(self):
        _check(self.every >= 0, "checkpoint.every", f"must be >= 0 (0 = final only), got {self.every}")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")
        _check(self.milestone_every >= 0, "checkpoint.milestone_every",
               f"must be >= 0 (0 = no milestones), got {self.milestone_every}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """A short next-token pretraining of a freshly initialized model on synthetic task text: it
    stands in for a pretrained base model in the tiny experiments. `template_fraction` of the
    documents use the R1 answer template; the rest answer bare, like a base model's web text."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    template_fraction: float = 0.2
    prompt_loss: bool = False  # also train on the (random, unpredictable) question tokens
    # Reasoning in words ("4 times 5 is 20") instead of symbols, each step written in a second
    # script (a Greek transliteration) with probability `second_script`: language mixing.
    words: bool = False
    second_script: float = 0.0

    def __post_init__(self):
        _check(self.steps >= 1, "pretrain.steps", f"must be >= 1, got {self.steps}")
        _check(0 <= self.template_fraction <= 1, "pretrain.template_fraction",
               f"must be in [0, 1], got {self.template_fraction}")
        _check(0 <= self.second_script <= 1, "pretrain.second_script",
               f"must be in [0, 1], got {self.second_script}")
        _check(self.words or self.second_script == 0, "pretrain.second_script",
               "needs pretrain.words=True (the second script writes the words)")

    @property
    def extra_chars(self) -> str:
        """Characters the built-in tokenizer needs besides its own for this corpus."""
        from grpo_jax.tasks.corpus import SECOND_SCRIPT_CHARS

        return SECOND_SCRIPT_CHARS if self.second_script > 0 else ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistConfig:
    """Multi-host start-up (`jax.distributed.initialize`). With `coordinator_address` set, every
    process runs the same command with its own `process_id` (GPU hosts, or several local CPU
    processes). Without it, "auto" initializes on a multi-host TPU VM slice and under SLURM with
    several tasks (JAX finds the coordinator itself) and does nothing on one host; "off" never
    initializes."""

    mode: Literal["auto", "off"] = "auto"
    coordinator_address: str | None = None  # HOST:PORT of process 0, e.g. 10.0.0.2:1234
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        _check_choice(self.mode, "dist.mode", ("auto", "off"))
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(x is not None for x in explicit):
            _check(None not in explicit, "dist", "an explicit start needs all three of "
                   "--dist.coordinator_address HOST:PORT, --dist.num_processes N and "
                   "--dist.process_id I")
            _check(0 <= self.process_id < self.num_processes, "dist.process_id",
                   f"must be in [0, {self.num_processes}), got {self.process_id}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
    """One GRPO run. B = `prompts_per_step`, G = `grpo.group_size`, N = B * G completions."""

    seed: int = 0
    steps: int = 100
    prompts_per_step: int = 16
    model: ModelSource
    sampler: SamplerConfig = SamplerConfig()
    grpo: GRPOConfig = GRPOConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    rewards: RewardConfig = RewardConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    pretrain: PretrainConfig | None = None
    mesh: MeshConfig = MeshConfig()  # device mesh when there is more than one device
    dist: DistConfig = DistConfig()
    # CPU backend, one process: XLA CPU devices that `grpo-jax run` creates before JAX starts
    # (0: one per core; 1: one device). Rollouts and evaluations decode data-parallel over them,
    # training stays on one device (sharding.use_cpu_devices; docs/benchmarks.md, session 5).
    cpu_devices: int = 0
    run_dir: str | None = None  # None: a new directory under runs/; an existing one resumes
    max_nonfinite_steps: int = 3  # stop after this many steps in a row with skipped updates
    allow_config_change: bool = False  # resume although the config differs from the run's

    def __post_init__(self):
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps",
               f"must be >= 1, got {self.max_nonfinite_steps}")
        _check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        _check(self.cpu_devices >= 0, "cpu_devices",
               f"must be >= 0 (0: one per core), got {self.cpu_devices}")
        _check(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        mb = self.grpo.minibatches * self.optim.micro_batches
        _check(self.prompts_per_step % mb == 0, "grpo.minibatches",
               f"prompts_per_step = {self.prompts_per_step} must split evenly into grpo.minibatches "
               f"({self.grpo.minibatches}) x optim.micro_batches ({self.optim.micro_batches}) = "
               f"{mb} parts (minibatches hold whole groups)")
        _check(self.pretrain is None or self.model.init is not None, "pretrain",
               "pretraining from scratch needs model.init (a fresh model), not model.path")

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.grpo.group_size
