"""Rejection sampling (DeepSeek-R1 stage 4, SPEC section 4): sample k completions per prompt from
an RL checkpoint, keep the correct, well-formed, single-language, non-repetitive ones, and write
them as an SFT dataset with their provenance.

Checks, each on by default and switched by `RejectionConfig`; a sample is kept when it passes all:
  correct     the correctness reward (`accuracy`, or `countdown`, ...) gives it 1;
  format      strict R1 format, <think> ... </think> <answer> ... </answer> and nothing else;
  language    share of the reasoning's letters in the target script (the example's `language`
              field, else latin) >= language_threshold;
  repetition  share of repeated word n-grams (rewards.length.repetition_penalty) <= max_repetition;
  length      min_tokens <= generated tokens <= max_tokens (on when either is set);
  complete    it ended with a stop token instead of running into max_new_tokens.
Kept samples are then deduplicated (same prompt id, same text up to whitespace) and capped at
`max_per_prompt` per prompt.

The dataset is JSON lines, one kept sample per line, written atomically, with its statistics
beside it (`FILE.jsonl` -> `FILE.stats.json`):

    grpo-jax rejection-sample --model runs/NAME --out data/rs.jsonl --prompts 1024 --samples 8
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import numpy as np

from grpo_jax.config import ModelConfig, _check
from grpo_jax.evaluation import (Decoding, Generations, PolicyArgs, prepare, progress_bar,
                                 sample_completions, score_rewards)
from grpo_jax.rewards import get_reward
from grpo_jax.rewards.length import repetition_penalty
from grpo_jax.tasks import Example

CHECKS = ("correct", "format", "language", "repetition", "length", "complete")
# The fields of a dataset row and their JSON types ("answer" may be anything, None included).
ROW_FIELDS = {"prompt_id": (str, int), "prompt": (str,), "question": (str,), "completion": (str,),
              "answer": (object,), "sample_index": (int,), "source": (str,), "rewards": (dict,),
              "tokens": (int,)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RejectionConfig:
    """How many completions to draw per prompt and which of them to keep (module docstring)."""

    samples_per_prompt: int = 8  # k completions drawn per prompt
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    reward: str = "accuracy"  # the correctness reward: a sample is correct when it scores 1
    require_correct: bool = True
    require_format: bool = True  # strict R1 format
    require_language: bool = True
    language_threshold: float = 0.95  # minimum share of letters in the target script
    max_repetition: float | None = 0.3  # maximum share of repeated word n-grams (None: off)
    repetition_ngram: int = 3
    min_tokens: int = 0  # generated tokens, the stop token included
    max_tokens: int | None = None  # None: no limit below max_new_tokens
    require_complete: bool = True  # reject completions cut off at max_new_tokens
    dedupe: bool = True  # drop repeats of (prompt id, whitespace-normalized completion)
    max_per_prompt: int | None = None  # keep at most this many per prompt (None: all)

    def __post_init__(self):
        _check(self.samples_per_prompt >= 1, "samples_per_prompt",
               f"must be >= 1, got {self.samples_per_prompt}")
        _check(self.temperature > 0 or (self.temperature == 0 and self.samples_per_prompt == 1),
               "temperature", f"must be > 0 (or 0 with samples_per_prompt=1: greedy gives k "
               f"identical completions), got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        try:
            get_reward(self.reward)
        except ValueError as e:
            raise ValueError(f"reward: {e}") from None
        _check(0 <= self.language_threshold <= 1, "language_threshold",
               f"must be in [0, 1], got {self.language_threshold}")
        _check(self.max_repetition is None or 0 <= self.max_repetition < 1, "max_repetition",
               f"must be in [0, 1) or None (off), got {self.max_repetition}")
        _check(self.repetition_ngram >= 1, "repetition_ngram",
               f"must be >= 1, got {self.repetition_ngram}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None
               or max(self.min_tokens, 1) <= self.max_tokens <= self.max_new_tokens, "max_tokens",
               f"must be in [max(min_tokens, 1), max_new_tokens={self.max_new_tokens}] or None, "
               f"got {self.max_tokens}")
        _check(self.max_per_prompt is None or self.max_per_prompt >= 1, "max_per_prompt",
               f"must be >= 1 or None (all), got {self.max_per_prompt}")

    @property
    def checks(self) -> tuple[str, ...]:
        """The checks that can reject a sample, in CHECKS order."""
        on = {"correct": self.require_correct, "format": self.require_format,
              "language": self.require_language, "repetition": self.max_repetition is not None,
              "length": self.min_tokens > 0 or self.max_tokens is not None,
              "complete": self.require_complete}
        return tuple(c for c in CHECKS if on[c])


def run_checks(examples: list[Example], gens: Generations,
               rcfg: RejectionConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(scores, passed), arrays [N]: the scores behind the checks (correct: the reward's value,
    format: 0 or 1, language: share in the target script, repetition: share of repeated word
    n-grams) and whether each sample passes each of CHECKS."""
    scored = score_rewards(examples, gens, (rcfg.reward, "format", "language"))
    rep_N = np.array([-repetition_penalty(c, rcfg.repetition_ngram) for c in gens.completions])
    scores = {"correct": scored.per_reward[rcfg.reward], "format": scored.per_reward["format"],
              "language": scored.per_reward["language"], "repetition": rep_N}
    n = gens.lengths_N
    passed = {
        "correct": scores["correct"] >= 1.0,
        "format": scores["format"] >= 1.0,
        "language": scores["language"] >= rcfg.language_threshold,
        "repetition": (rep_N <= rcfg.max_repetition if rcfg.max_repetition is not None
                       else np.ones(len(rep_N), bool)),
        "length": (n >= rcfg.min_tokens) & (n <= (rcfg.max_tokens or rcfg.max_new_tokens)),
        "complete": ~gens.truncated_N,
    }
    return scores, passed


def filter_samples(examples: list[Example], gens: Generations, rcfg: RejectionConfig, *,
                   source: str) -> tuple[list[dict], dict]:
    """(rows, stats) from decoded samples (host only; see `rejection_sample`)."""
    g = gens.group_size
    scores, passed = run_checks(examples, gens, rcfg)
    ok_N = np.ones(len(gens.completions), bool)
    for c in rcfg.checks:
        ok_N &= passed[c]
    rows: list[dict] = []
    seen: set[tuple[Any, str]] = set()
    kept = collections.Counter()
    duplicates = capped = 0
    for i in np.flatnonzero(ok_N):
        p, s = divmod(int(i), g)
        ex = examples[p]
        pid = ex["id"] if "id" in ex else p
        text = gens.completions[i]
        if rcfg.dedupe:
            key = (pid, " ".join(text.split()))
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        if rcfg.max_per_prompt is not None and kept[pid] >= rcfg.max_per_prompt:
            capped += 1
            continue
        kept[pid] += 1
        rows.append({"prompt_id": pid, "prompt": gens.prompts[p], "question": ex["question"],
                     "completion": text, "answer": ex.get("answer"), "sample_index": s,
                     "source": source, "rewards": {k: float(v[i]) for k, v in scores.items()},
                     "tokens": int(gens.lengths_N[i])})
    n = len(gens.completions)
    stats = {
        "prompts": len(examples), "samples": n, "samples_per_prompt": g,
        "failed": {c: int((~passed[c]).sum()) for c in rcfg.checks},  # a sample can fail several
        "passed_checks": int(ok_N.sum()), "duplicates": duplicates, "capped": capped,
        "accepted": len(rows), "acceptance_rate": len(rows) / n,
        "prompts_with_accepted": len(kept), "source": source, "config": dataclasses.asdict(rcfg),
    }
    return rows, stats


def rejection_sample(params, cfg: ModelConfig, tok, examples: list[Example], rcfg: RejectionConfig,
                     *, template: str, key: jax.Array, max_prompt_tokens: int, batch_prompts: int,
                     source: str, bucket: int = 16, mesh=None,
                     progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """Sample `rcfg.samples_per_prompt` completions per example (one sampler shape for all
    batches), keep those passing every enabled check, deduplicate and cap them.

    rows: one dict per kept sample: prompt_id (the example's id, else its index), prompt (the
    formatted text), question, completion, answer (the gold answer), sample_index, source (the
    checkpoint), rewards (each check's score), tokens (generated, stop token included).
    stats: prompts, samples, failed (per check; a sample can fail several), passed_checks,
    duplicates, capped, accepted, acceptance_rate, prompts_with_accepted, source, config."""
    (gens,) = sample_completions(
        params, cfg, tok, examples, template=template, max_new_tokens=rcfg.max_new_tokens,
        decodings=(Decoding(samples=rcfg.samples_per_prompt, temperature=rcfg.temperature,
                            top_p=rcfg.top_p),),
        max_prompt_tokens=max_prompt_tokens, batch_prompts=batch_prompts, key=key, bucket=bucket,
        mesh=mesh, progress=progress)
    return filter_samples(examples, gens, rcfg, source=source)


# ----------------------------------------------------------------------------- dataset files


def stats_path(path: str | Path) -> Path:
    """Where the statistics of dataset `path` go: `X.jsonl` -> `X.stats.json`."""
    p = Path(path)
    return p.with_name((p.stem if p.suffix == ".jsonl" else p.name) + ".stats.json")


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and `os.replace`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dataset(rows: list[dict], stats: dict, path: str | Path) -> Path:
    """`path` (JSON lines, one row each) and `stats_path(path)`, each written atomically."""
    p = Path(path)
    _write_atomic(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_atomic(stats_path(p), json.dumps(stats, indent=1) + "\n")
    return p


def read_dataset(path: str | Path) -> list[dict]:
    """The rows of a rejection-sampling dataset; a malformed line is an error naming the file and
    the line (blank lines are skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in ROW_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing}; rows need {list(ROW_FIELDS)}")
            for k, types in ROW_FIELDS.items():
                v = row[k]
                if not isinstance(v, types) or (isinstance(v, bool) and int in types):
                    raise ValueError(f"{where}: field {k!r} is {type(v).__name__}, expected "
                                     f"{' or '.join(t.__name__ for t in types)}")
            rows.append(row)
    return rows


def sft_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, completion) text pairs, as `grpo_jax.sft.encode_pairs` takes them (it appends
    EOS to each completion)."""
    return [(r["prompt"], r["completion"]) for r in rows]


# ----------------------------------------------------------------------------- command line

_DEFAULTS = RejectionConfig()  # the command's defaults are the config's


@dataclasses.dataclass(frozen=True, kw_only=True)
class RejectionArgs(PolicyArgs):
    """Rejection-sample an SFT dataset from a policy: k completions per prompt, keep those
    passing every enabled check. Writes OUT (JSON lines) and its statistics X.stats.json beside
    it (for OUT = X.jsonl)."""

    out: Path  # the dataset file, e.g. data/rs.jsonl
    prompts: int = 256  # prompts to draw (repeated problems are sampled once)
    split: Literal["train", "eval"] = "train"  # the prompts' split (train: no eval problem in SFT)
    samples: int = _DEFAULTS.samples_per_prompt  # k completions per prompt
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    reward: str = _DEFAULTS.reward  # correctness reward; countdown for Countdown
    require_correct: bool = _DEFAULTS.require_correct
    require_format: bool = _DEFAULTS.require_format
    require_language: bool = _DEFAULTS.require_language
    language_threshold: float = _DEFAULTS.language_threshold  # min share in the target script
    max_repetition: float | None = _DEFAULTS.max_repetition  # max share of repeated 3-grams
    min_tokens: int = _DEFAULTS.min_tokens  # generated tokens, the stop token included
    max_tokens: int | None = _DEFAULTS.max_tokens  # None: up to max_new_tokens
    require_complete: bool = _DEFAULTS.require_complete  # reject completions cut off
    dedupe: bool = _DEFAULTS.dedupe  # one copy per (prompt, text up to whitespace)
    max_per_prompt: int | None = _DEFAULTS.max_per_prompt  # None: keep all


def rejection_main(argv: list[str]) -> dict:
    """`grpo-jax rejection-sample --model PATH --task NAME --out FILE.jsonl [...]`; returns the
    statistics."""
    import tyro

    args = tyro.cli(RejectionArgs, args=argv, prog="grpo-jax rejection-sample",
                    config=(tyro.conf.FlagConversionOff,))

    def say(msg):
        print(f"[grpo-jax rejection-sample] {msg}", flush=True)

    try:  # setup errors are the user's to fix: a message, not a traceback
        setup = prepare(args, say)
        s = setup.settings
        rcfg = RejectionConfig(
            samples_per_prompt=args.samples, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=s["max_new_tokens"], reward=args.reward,
            require_correct=args.require_correct, require_format=args.require_format,
            require_language=args.require_language, language_threshold=args.language_threshold,
            max_repetition=args.max_repetition, min_tokens=args.min_tokens,
            max_tokens=args.max_tokens, require_complete=args.require_complete,
            dedupe=args.dedupe, max_per_prompt=args.max_per_prompt)
        drawn = (setup.task.train(args.prompts, seed=args.seed) if args.split == "train"
                 else setup.task.eval(args.prompts))
    except (OSError, ValueError) as e:
        raise SystemExit(f"grpo-jax rejection-sample: error: {e}") from None
    examples = list({ex.get("id", i): ex for i, ex in enumerate(drawn)}.values())
    say(f"{len(examples)} distinct {args.split} prompts of {len(drawn)} drawn, "
        f"{rcfg.samples_per_prompt} samples each; checks: {', '.join(rcfg.checks) or 'none'}")
    progress, close = progress_bar(len(examples), "rejection-sample", args.progress)
    rows, stats = rejection_sample(setup.params, setup.cfg, setup.tok, examples, rcfg,
                                   template=s["template"], key=jax.random.key(args.seed),
                                   max_prompt_tokens=s["max_prompt_tokens"],
                                   batch_prompts=args.batch_prompts, source=setup.source,
                                   mesh=setup.mesh, progress=progress)
    close()
    stats["settings"] = s | {"split": args.split, "seed": args.seed}
    path = write_dataset(rows, stats, args.out)
    fails = ", ".join(f"{k} {v}" for k, v in stats["failed"].items())
    say(f"kept {stats['accepted']} of {stats['samples']} samples ({stats['acceptance_rate']:.1%}; "
        f"failed: {fails or 'nothing checked'}; duplicates {stats['duplicates']}, capped "
        f"{stats['capped']}) for {stats['prompts_with_accepted']} of {stats['prompts']} prompts")
    say(f"wrote {path} and {stats_path(path)}")
    return stats
