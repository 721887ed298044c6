"""Held-out evaluation as R1 reports it (SPEC section 5), and the `grpo-jax eval` command.

For P problems and k samples each (temperature 0.6, top-p 0.95 in R1):
  pass@1      mean correctness over the P * k samples;
  pass@j      the unbiased estimator of Chen et al. (2021) from each problem's count of correct
              samples, for each requested j <= k;
  cons@k      majority vote over each problem's k final answers, then the voted answer's
              correctness;
  greedy      correctness of one greedy completion per problem;
plus the strict-format rate, language consistency (share of the reasoning's letters in the
example's `language` field's script, else latin) and mean completion length of the samples.

A sample is correct when the `reward` (default `accuracy`; `countdown` for Countdown) gives it its
full score, 1. Answers are extracted and compared by `rewards.math_answer`, so "1/2", "0.5" and
"\\frac{1}{2}" are one answer, both for correctness and for the vote.

    grpo-jax eval --model runs/tiny_r1_zero-... --problems 256 --samples 16
    grpo-jax eval --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k \\
        --task-args '{"path": "gsm8k/train.jsonl", "eval_path": "gsm8k/test.jsonl"}' --template chat_r1
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import hf_io
from grpo_jax.config import ModelConfig, SamplerConfig
from grpo_jax.rewards import get_reward
from grpo_jax.rewards.combine import score_completions
from grpo_jax.rewards.math_answer import answers_match, extract_answer, normalize_answer
from grpo_jax.sharding import to_host
from grpo_jax.sampler import Sampler, pad_prompts
from grpo_jax.tasks import Example, Task, get_task
from grpo_jax.tasks.templates import TemplateName, format_prompt
from grpo_jax.trainer import decode, prompt_ids

# ----------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c, k: int):
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    eq. 1): the chance that k of the n samples, drawn without replacement, include one of the c
    correct ones,

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i),

    the product form avoiding huge binomials. `c` is a count or an array of counts (one per
    problem; the result is then an array)."""
    c_P = np.asarray(c)
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if np.any((c_P < 0) | (c_P > n)):
        raise ValueError(f"pass@k needs 0 <= c <= n={n}, got c={c}")
    i = np.arange(1, n + 1)
    # When n - c < k the factor at i = k is exactly 0: pass@k = 1.
    factors = np.where(i > (n - c_P)[..., None], 1.0 - k / i, 1.0)
    out = 1.0 - np.prod(factors, axis=-1)
    return float(out) if c_P.ndim == 0 else out


def majority_vote(answers: Sequence[str | None]) -> tuple[int | None, int]:
    """(index of the first sample of the most voted answer, its votes); (None, 0) when no sample
    has an answer. Answers vote together when `answers_match` says they are equal (numbers,
    fractions, LaTeX forms, tuples; no symbolic algebra, which would cost a sympy call per pair);
    ties go to the answer seen first."""
    norms = [None if a is None else normalize_answer(a) for a in answers]
    firsts: list[int] = []  # each cluster's first sample
    votes: list[int] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for j, f in enumerate(firsts):
            if norms[i] == norms[f] or answers_match(a, answers[f], symbolic=False):
                votes[j] += 1
                break
        else:
            firsts.append(i)
            votes.append(1)
    if not firsts:
        return None, 0
    best = max(range(len(firsts)), key=lambda j: (votes[j], -j))
    return firsts[best], votes[best]


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoding:
    """One way to sample every problem: `samples` completions at `temperature` (0 = greedy)."""

    samples: int
    temperature: float
    top_p: float = 1.0

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclasses.dataclass(frozen=True)
class Generations:
    """Decoded completions of P problems, G per problem, problem-major: row p * G + g is sample g
    of problem p (N = P * G)."""

    prompts: list[str]  # P formatted prompts
    completions: list[str]  # N decoded completions, special tokens dropped
    lengths_N: np.ndarray  # generated tokens, the stop token included
    truncated_N: np.ndarray  # reached max_new_tokens without a stop token
    group_size: int


def sample_completions(params, cfg: ModelConfig, tok, examples: list[Example], *, template: str,
                       decodings: Sequence[Decoding], max_new_tokens: int, max_prompt_tokens: int,
                       batch_prompts: int, key: jax.Array, bucket: int = 16,
                       long_prompts: str = "error", mesh=None,
                       progress: Callable[[int], None] | None = None) -> list[Generations]:
    """Format and sample every example under each decoding (one `Generations` per decoding).

    Every batch holds the same number of prompts (the last one is filled with copies of its
    first) padded to the length of the longest prompt of all, so each decoding compiles once.
    The key of the batch starting at problem s is fold_in(key, s); `progress(problems done)`."""
    if not examples:
        raise ValueError("no examples to sample")
    stop = (tok.eos_token_id,)
    samplers: list[Sampler] = []
    for d in decodings:  # one decoding copy of the weights for all (`weights_from`)
        samplers.append(Sampler(cfg, SamplerConfig(max_new_tokens=max_new_tokens,
                                                   temperature=d.temperature, top_p=d.top_p,
                                                   stop_ids=stop, prompt_bucket=bucket),
                                pad_id=tok.pad_token_id, mesh=mesh,
                                weights_from=samplers[0] if samplers else None))
    texts = [format_prompt(ex, template, tok) for ex in examples]
    ids = prompt_ids(tok, texts, examples, max_prompt_tokens, long_prompts)
    longest = max(len(i) for i in ids)
    b = min(batch_prompts, len(ids))
    parts: list[tuple[list, list, list]] = [([], [], []) for _ in decodings]
    for start in range(0, len(ids), b):
        chunk = ids[start:start + b]
        real = len(chunk)
        p_tok, p_mask = pad_prompts(chunk + [chunk[0]] * (b - real), bucket=bucket,
                                    pad_id=tok.pad_token_id, min_len=longest)
        k = jax.random.fold_in(key, start)
        for d, sampler, (comps, lengths, truncated) in zip(decodings, samplers, parts):
            out = to_host(sampler(params, p_tok, p_mask, k, group_size=d.samples))
            n = real * d.samples
            comps += decode(tok, out.tokens[:n], out.lengths[:n])
            lengths.append(np.asarray(out.lengths[:n]))
            truncated.append(np.asarray(out.truncated[:n]))
        if progress is not None:
            progress(start + real)
    return [Generations(prompts=texts, completions=comps, lengths_N=np.concatenate(lengths),
                        truncated_N=np.concatenate(truncated), group_size=d.samples)
            for d, (comps, lengths, truncated) in zip(decodings, parts)]


def example_fields(examples: list[Example], gens: Generations) -> dict[str, list]:
    """The examples' fields repeated for each of their completions, plus `completion_length`:
    the keyword arguments of the reward functions (the trainer passes the same)."""
    g = gens.group_size
    fields = {k: [ex.get(k) for ex in examples for _ in range(g)] for k in examples[0]}
    fields["completion_length"] = [int(n) for n in gens.lengths_N]
    return fields


def score_rewards(examples: list[Example], gens: Generations, names: Sequence[str]):
    """`RewardResult` of the completions under the registered rewards `names` (failures score 0
    and are counted, as in training)."""
    prompts = [p for p in gens.prompts for _ in range(gens.group_size)]
    return score_completions(prompts, gens.completions, example_fields(examples, gens),
                             {name: 1.0 for name in names}, on_error="zero")


# ----------------------------------------------------------------------------- evaluation


def check_pass_ks(pass_ks: Sequence[int] | None, samples: int) -> tuple[int, ...]:
    """The sorted distinct k of pass@k to report; None: (1, samples)."""
    ks = tuple(sorted(set(pass_ks if pass_ks is not None else (1, samples))))
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad or not ks:
        raise ValueError(f"pass_ks: each k must be in [1, samples={samples}], got {list(ks)}; "
                         "draw more samples or ask for smaller k")
    return ks


def evaluate_policy(params, cfg: ModelConfig, tok, examples: list[Example], *, template: str,
                    samples: int, temperature: float = 0.6, top_p: float = 0.95,
                    max_new_tokens: int, max_prompt_tokens: int, batch_prompts: int,
                    key: jax.Array, pass_ks: Sequence[int] | None = None,
                    reward: str = "accuracy", bucket: int = 16, rows: bool = False,
                    long_prompts: str = "error", mesh=None,
                    progress: Callable[[int], None] | None = None) -> dict:
    """pass@1 over `samples` completions per problem, pass@k for k in `pass_ks` (default
    (1, samples)), cons@k, greedy accuracy, format rate, language consistency, mean length (see
    the module docstring). `rows=True` adds the per-problem rows (completions included)."""
    ks = check_pass_ks(pass_ks, samples)
    get_reward(reward)  # a misspelled name fails before any sampling
    sampled, greedy = sample_completions(
        params, cfg, tok, examples, template=template, max_new_tokens=max_new_tokens,
        decodings=(Decoding(samples=samples, temperature=temperature, top_p=top_p),
                   Decoding(samples=1, temperature=0.0)),
        max_prompt_tokens=max_prompt_tokens, batch_prompts=batch_prompts, key=key, bucket=bucket,
        long_prompts=long_prompts, mesh=mesh, progress=progress)
    return score_generations(examples, sampled, greedy, reward=reward, pass_ks=ks, rows=rows)


def score_generations(examples: list[Example], sampled: Generations, greedy: Generations, *,
                      reward: str = "accuracy", pass_ks: Sequence[int] = (1,),
                      rows: bool = False) -> dict:
    """The metrics of `evaluate_policy` from already decoded completions (host only)."""
    p, g = len(examples), sampled.group_size
    scored = score_rewards(examples, sampled, (reward, "format", "language"))
    correct_PxG = (scored.per_reward[reward] >= 1.0).reshape(p, g)
    format_PxG = (scored.per_reward["format"] >= 1.0).reshape(p, g)
    language_PxG = scored.per_reward["language"].reshape(p, g)
    greedy_scored = score_rewards(examples, greedy, (reward,))
    greedy_P = greedy_scored.per_reward[reward] >= 1.0
    answers = [extract_answer(c) for c in sampled.completions]
    votes = [majority_vote(answers[i * g:(i + 1) * g]) for i in range(p)]
    cons_P = np.array([v is not None and bool(correct_PxG[i, v]) for i, (v, _) in enumerate(votes)])
    n_correct_P = correct_PxG.sum(1)

    result: dict[str, Any] = {"pass_at_1": float(correct_PxG.mean())}
    for k in pass_ks:
        if k != 1:  # pass@1 is the plain mean (the estimator equals it up to rounding)
            result[f"pass_at_{k}"] = float(np.mean(pass_at_k(g, n_correct_P, k)))
    result |= {
        "cons_at_k": float(cons_P.mean()),
        "greedy_accuracy": float(greedy_P.mean()),
        "format_rate": float(format_PxG.mean()),
        "language_consistency": float(language_PxG.mean()),
        "mean_length": float(sampled.lengths_N.mean()),
        "truncated_rate": float(sampled.truncated_N.mean()),
        "problems": p,
        "samples_per_problem": g,
    }
    failures = {k: v for s in (scored, greedy_scored) for k, v in s.failures.items() if v}
    if failures:
        result["reward_failures"] = failures
    if rows:
        result["rows"] = [{
            "id": ex.get("id", i), "question": ex["question"], "answer": ex.get("answer"),
            "completions": sampled.completions[i * g:(i + 1) * g],
            "extracted": answers[i * g:(i + 1) * g],
            "correct": [bool(x) for x in correct_PxG[i]],
            "format": [bool(x) for x in format_PxG[i]],
            "language": [float(x) for x in language_PxG[i]],
            "lengths": [int(x) for x in sampled.lengths_N[i * g:(i + 1) * g]],
            "truncated": [bool(x) for x in sampled.truncated_N[i * g:(i + 1) * g]],
            "voted": None if v is None else answers[i * g + v], "votes": n,
            "cons_correct": bool(cons_P[i]),
            "greedy_completion": greedy.completions[i], "greedy_correct": bool(greedy_P[i]),
        } for i, (ex, (v, n)) in enumerate(zip(examples, votes))]
    return result


# ----------------------------------------------------------------------------- report

_LABELS = {"pass_at_1": "pass@1 (mean over samples)", "cons_at_k": "cons@{k}",
           "greedy_accuracy": "greedy accuracy", "format_rate": "format rate (strict)",
           "language_consistency": "language consistency", "mean_length": "mean length (tokens)",
           "truncated_rate": "truncated rate", "problems": "problems",
           "samples_per_problem": "samples per problem"}


def format_table(result: dict) -> str:
    """The metrics of a result as a markdown table."""
    k = result["samples_per_problem"]
    extra = sorted((key for key in result if key.startswith("pass_at_") and key != "pass_at_1"),
                   key=lambda s: int(s.rsplit("_", 1)[1]))
    order = ["pass_at_1", *extra, *(key for key in _LABELS if key != "pass_at_1")]
    lines = ["| metric | value |", "|---|---:|"]
    for key in order:
        v = result[key]
        label = _LABELS.get(key, key.replace("pass_at_", "pass@")).format(k=k)
        lines.append(f"| {label} | {v if isinstance(v, int) else f'{v:.4f}'} |")
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path) -> Path:
    """`eval.json` (everything in `result`) and `eval.md` (settings and the metrics table) in
    `out_dir`, which is created; returns it."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.json").write_text(json.dumps(result, indent=1))
    settings = result.get("settings", {})
    head = ["# Evaluation", ""] + [f"- {k}: `{v if isinstance(v, str) else json.dumps(v)}`"
                                   for k, v in settings.items()]
    (d / "eval.md").write_text("\n".join(head + ["", format_table(result), ""]))
    return d


# ----------------------------------------------------------------------------- policies


def run_config(path: str | Path) -> dict | None:
    """The resolved experiment config (config.json) of a grpo-jax run directory; None for
    anything else (a Hugging Face config.json has no "data"/"sampler"/"grpo" sections)."""
    f = Path(path).expanduser() / "config.json"
    if not f.is_file():
        return None
    try:
        conf = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None  # not ours; the Hugging Face loader reports what is wrong with it
    return conf if isinstance(conf, dict) and {"data", "sampler", "grpo"} <= conf.keys() else None


def policy_dir(path: str | Path) -> str:
    """The Hugging Face directory (or hub id) holding the policy at `path`: `path` itself, or
    `path/hf_model` for a grpo-jax run directory. Errors name the problem and the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        s = str(path)
        if s.startswith((".", "/", "~")) or s.count("/") != 1:
            raise FileNotFoundError(
                f"{path}: no such file or directory. Pass a Hugging Face model directory "
                "(config.json + model.safetensors), a grpo-jax run directory (runs/NAME, with "
                "hf_model/ inside) or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
        return s  # a hub id: hf_io downloads it, or says why it could not
    if not p.is_dir():
        raise NotADirectoryError(f"{path}: is a file; pass the model or run directory that holds it")
    if run_config(p) is not None:
        d = p / "hf_model"
        if not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"{p} is a grpo-jax run directory but {d}/config.json is missing: the run has not "
                "finished (the Hugging Face export is written at the end). Pass a finished run "
                "or a Hugging Face model directory")
        return str(d)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p}: no config.json. Pass a Hugging Face model directory (config.json + "
            "model.safetensors) or a grpo-jax run directory (config.json + hf_model/)")
    return str(p)


def resolve_policy(path: str | Path, *, step: int | None = None,
                   say: Callable[[str], None] = print):
    """(cfg, params, tokenizer) of the policy at `path` (see `policy_dir`): the one place that
    turns a path into a policy. `step` picks an orbax checkpoint of a grpo-jax run directory."""
    if step is not None:
        from grpo_jax.checkpoints import load_policy

        cfg, params, tok, step = load_policy(path, step)
        say(f"{path}: using its checkpoint at step {step}")
        return cfg, jax.tree.map(jnp.asarray, params), tok
    d = policy_dir(path)
    if Path(d) != Path(path).expanduser():
        say(f"{path} is a grpo-jax run directory: using its final policy {d}")
    cfg, params = hf_io.load(d)
    tok = hf_io.load_tokenizer(d, vocab_size=cfg.vocab_size)
    return cfg, jax.tree.map(jnp.asarray, params), tok


# ----------------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyArgs:
    """A policy and the task it is run on. For a grpo-jax run directory, the task, its arguments,
    the template and the token limits default to the run's own config."""

    model: str  # Hugging Face directory, hub id, or grpo-jax run directory (uses RUN/hf_model)
    step: int | None = None  # with a run directory: its orbax checkpoint at this step
    task: str | None = None  # registered task (arithmetic, countdown, gsm8k, ...); None: the run's
    task_args: str | None = None  # the task's keyword arguments, a JSON object; None: the run's or {}
    template: TemplateName | None = None  # prompt template; None: the run's, else r1_zero
    max_new_tokens: int | None = None  # completion budget; None: the run's, else 1024
    max_prompt_tokens: int | None = None  # longer prompts are an error; None: the run's, else 512
    batch_prompts: int = 64  # prompts per sampler call (all calls have this shape)
    seed: int = 0
    progress: bool = True
    # XLA CPU devices to decode on, one program each (0: one per core, 1: one device); only on
    # the CPU backend, as in `grpo-jax run` (sharding.use_cpu_devices).
    cpu_devices: int = 0


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `prepare` resolved from `PolicyArgs`."""

    cfg: ModelConfig
    params: Any
    tok: Any
    source: str  # the Hugging Face directory (or hub id) loaded
    task: Task
    settings: dict  # the resolved task, template and limits, for reports
    mesh: Any = None  # the CPU devices to decode on (`sharding.cpu_rollout_mesh`), or None


def prepare(args: PolicyArgs, say: Callable[[str], None]) -> Setup:
    """Load the policy and build the task, filling unset options from the run's config."""
    from grpo_jax import sharding

    if args.cpu_devices < 0:
        raise ValueError(f"--cpu-devices must be >= 0 (0: one per core), got {args.cpu_devices}")
    sharding.use_cpu_devices(args.cpu_devices)  # before JAX starts (else it stays as it is)
    run = run_config(args.model)
    data, sampler = (run["data"], run["sampler"]) if run else ({}, {})
    task_name = args.task or data.get("task")
    if task_name is None:
        raise ValueError(f"--task is required: {args.model} is not a grpo-jax run directory whose "
                         "config names one (e.g. --task arithmetic, or --task gsm8k --task-args "
                         "'{\"path\": \"train.jsonl\", \"eval_path\": \"test.jsonl\"}')")
    task_args_text = args.task_args
    if task_args_text is None:  # the run's task arguments belong to the run's task only
        task_args_text = data.get("task_args", "{}") if task_name == data.get("task") else "{}"
    try:
        task_args = json.loads(task_args_text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--task-args is not valid JSON ({e}): {task_args_text!r}") from None
    if not isinstance(task_args, dict):
        raise ValueError(f"--task-args must be a JSON object like '{{\"digits\": [1, 2]}}', "
                         f"got {task_args_text!r}")
    try:
        task = get_task(task_name, **task_args)
    except TypeError as e:  # an argument the task does not take
        raise ValueError(f"--task-args {task_args_text} do not fit task {task_name!r}: {e}") from None
    settings = {
        "model": args.model, "task": task_name, "task_args": task_args,
        "template": args.template or data.get("template", "r1_zero"),
        "max_new_tokens": (args.max_new_tokens if args.max_new_tokens is not None
                           else sampler.get("max_new_tokens", 1024)),
        "max_prompt_tokens": (args.max_prompt_tokens if args.max_prompt_tokens is not None
                              else data.get("max_prompt_tokens", 512)),
    }
    source = policy_dir(args.model) if args.step is None else f"{args.model}@step_{args.step}"
    cfg, params, tok = resolve_policy(args.model, step=args.step, say=say)
    mesh = sharding.cpu_rollout_mesh()
    where = f"; decoding on {mesh.size} CPU devices" if mesh is not None else ""
    say(f"policy {source}: {cfg.arch}, {cfg.num_params / 1e6:.1f}M parameters; task {task_name} "
        f"{json.dumps(task_args)}, template {settings['template']}{where}")
    return Setup(cfg=cfg, params=params, tok=tok, source=source, task=task,
                 settings=settings | {"source": source}, mesh=mesh)


def progress_bar(total: int, desc: str, enabled: bool) -> tuple[Callable[[int], None], Callable]:
    """(progress(done) callback, close) of a tqdm bar."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    return (lambda n: bar.update(n - bar.n)), bar.close


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalArgs(PolicyArgs):
    """Evaluate a policy on a task's held-out problems: pass@1 over k samples, pass@k, cons@k,
    greedy accuracy, format rate, language consistency, length. Writes eval.json and eval.md."""

    problems: int = 256  # the first N problems of the task's eval split
    samples: int = 16  # k: completions per problem
    temperature: float = 0.6
    top_p: float = 0.95
    pass_ks: tuple[int, ...] = ()  # k of pass@k to report; empty: 1 and samples
    reward: str = "accuracy"  # correctness reward (full score = correct); countdown for Countdown
    out: Path | None = None  # output directory; None: runs/eval-<model name>-<task>


def eval_main(argv: list[str]) -> dict:
    """`grpo-jax eval --model PATH --task NAME [...]`; returns the result."""
    import tyro

    args = tyro.cli(EvalArgs, args=argv, prog="grpo-jax eval",
                    config=(tyro.conf.FlagConversionOff,))

    def say(msg):
        print(f"[grpo-jax eval] {msg}", flush=True)

    try:  # setup errors are the user's to fix: a message, not a traceback
        ks = check_pass_ks(args.pass_ks or None, args.samples)
        get_reward(args.reward)
        setup = prepare(args, say)
        examples = setup.task.eval(args.problems)
    except (OSError, ValueError) as e:
        raise SystemExit(f"grpo-jax eval: error: {e}") from None
    s = setup.settings
    progress, close = progress_bar(len(examples), "eval", args.progress)
    result = evaluate_policy(setup.params, setup.cfg, setup.tok, examples, template=s["template"],
                             samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                             max_new_tokens=s["max_new_tokens"],
                             max_prompt_tokens=s["max_prompt_tokens"],
                             batch_prompts=args.batch_prompts, key=jax.random.key(args.seed),
                             pass_ks=ks, reward=args.reward, rows=True, mesh=setup.mesh,
                             progress=progress)
    close()
    result["settings"] = s | {"problems": len(examples), "samples": args.samples,
                              "temperature": args.temperature, "top_p": args.top_p,
                              "reward": args.reward, "seed": args.seed}
    name = Path(args.model.rstrip("/")).name or "model"
    out = write_report(result, args.out or Path("runs") / f"eval-{name}-{s['task']}")
    print(format_table(result))
    say(f"wrote {out / 'eval.json'} (metrics, settings, per-problem completions) and {out / 'eval.md'}")
    return result

