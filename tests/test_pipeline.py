"""The R1 pipeline: stages in order, each alone, resume at the stage that stopped."""

import dataclasses
import json
from pathlib import Path

import pytest

from grpo_jax.config import (DataConfig, EvalConfig, Experiment, GRPOConfig, LogConfig, ModelConfig,
                             ModelSource, OptimConfig, PretrainConfig, RewardConfig, SamplerConfig)
from grpo_jax.pipeline import (EvalStage, GRPOStage, Pipeline, PipelineRun, PretrainStage,
                               RejectionStage, SFTStage, StageModelReward, run_pipeline)
from grpo_jax.rejection import RejectionConfig, read_dataset
from grpo_jax.sft import SFTConfig

TINY = ModelConfig(arch="qwen2", vocab_size=112, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1, attention_bias=True, tie_word_embeddings=True)
SFT = SFTConfig(epochs=1, batch_size=8, max_len=64, optim=OptimConfig(lr=1e-2))
GRPO = Experiment(steps=2, prompts_per_step=4, model=ModelSource(init=TINY),
                  sampler=SamplerConfig(max_new_tokens=16),
                  grpo=GRPOConfig(group_size=4, kl_coef=0.0),
                  rewards=RewardConfig(weights=(("accuracy", 1.0), ("language", 0.2))),
                  eval=EvalConfig(samples=1, batch_prompts=8),
                  log=LogConfig(progress=False, tensorboard=False))
# Accept everything that is not truncated, so that a random model yields a dataset.
LOOSE = RejectionConfig(samples_per_prompt=2, max_new_tokens=16, require_correct=False,
                        require_format=False, require_language=False, max_repetition=None,
                        require_complete=False)


def _pipeline(tmp_path, **kw) -> Pipeline:
    return Pipeline(**{**_pipeline_fields(tmp_path), **kw})


def _pipeline_fields(tmp_path) -> dict:
    return dict(
        seed=1, progress=False, run_dir=str(tmp_path / "pipe"),
        data=DataConfig(task="arithmetic", task_args='{"digits": [1, 1], "operators": "+"}',
                        template="short", max_prompt_tokens=32, eval_problems=8),
        eval=EvalConfig(samples=2, batch_prompts=8),
        stages=(
            PretrainStage(name="base", model=TINY, max_len=64, pretrain=PretrainConfig(
                steps=3, batch_size=8, words=True, second_script=0.5)),
            SFTStage(name="cold_start", policy="base", curated=8, sft=SFT),
            GRPOStage(name="rl", policy="cold_start", experiment=dataclasses.replace(
                GRPO, rewards=RewardConfig(weights=GRPO.rewards.weights + (("judge", 0.1),))),
                model_rewards=(StageModelReward(name="judge", stage="base", options=(
                    ("prompt_template", "User: {question} Assistant:{response} Right? "),
                    ("yes_tokens", ("Y",)), ("no_tokens", ("N",)))),)),
            RejectionStage(name="rejection", policy="rl", prompts=6, rejection=LOOSE,
                           batch_prompts=8),
            SFTStage(name="sft2", policy="base", curated=4, datasets=("rejection",), sft=SFT),
            EvalStage(name="report", policies=(("base", "base"), ("r1", "sft2"))),
        ))


def test_pipeline_runs_resumes_and_runs_stages_alone(tmp_path, monkeypatch):
    pipe = _pipeline(tmp_path)
    d = Path(pipe.run_dir)
    # An interruption inside the SFT stage after the rejection stage: the earlier stages are kept.
    real = PipelineRun._SFTStage
    calls = []

    def failing(self, st, sd):
        calls.append(st.name)
        if st.name == "sft2":
            raise KeyboardInterrupt("interrupted")
        return real(self, st, sd)

    monkeypatch.setattr(PipelineRun, "_SFTStage", failing)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(pipe)
    for name in ("base", "cold_start", "rl", "rejection"):
        assert (d / name / "stage.json").exists(), name
    assert not (d / "sft2" / "stage.json").exists()
    mtimes = {n: (d / n / "stage.json").stat().st_mtime for n in ("base", "rl")}
    monkeypatch.setattr(PipelineRun, "_SFTStage", real)
    records = run_pipeline(pipe)  # resumes at sft2
    assert {n: (d / n / "stage.json").stat().st_mtime for n in ("base", "rl")} == mtimes

    # The model-based reward (the base model as a yes/no judge) scored the RL stage's samples.
    rl_rows = [json.loads(l) for l in (d / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["reward/judge"] < 1 for r in rl_rows)

    # The SFT stage read the rejection dataset back: its pairs are the accepted rows + curated.
    rows = read_dataset(d / "rejection" / "dataset.jsonl")
    stats = json.loads((d / "rejection" / "dataset.stats.json").read_text())
    assert stats["accepted"] == len(rows) > 0
    assert records["sft2"]["pairs"] == len(rows) + 4
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary) == {"base", "r1", "wall_s"}
    for key in ("pass_at_1", "cons_at_k", "format_rate", "language_consistency", "mean_length"):
        assert 0 <= summary["r1"][key] <= (1 if key != "mean_length" else 16)
    report = (d / "report.md").read_text()
    assert "| r1 | sft2 |" in report and "rl/curves.png" in report

    # One stage alone: rerun, in place, from its inputs.
    before = (d / "sft2" / "stage.json").stat().st_mtime
    run_pipeline(pipe, only="sft2")
    assert (d / "sft2" / "stage.json").stat().st_mtime > before


def test_a_stage_alone_needs_its_inputs_and_a_changed_pipeline_is_refused(tmp_path):
    from grpo_jax.runner import ConfigMismatch

    pipe = _pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="stage 'cold_start' has not finished.*--stage cold_start"):
        run_pipeline(pipe, only="rl")
    other = dataclasses.replace(pipe, seed=2)
    with pytest.raises(ConfigMismatch, match="seed: 1 -> 2"):
        run_pipeline(other)


def test_bad_stage_references_are_named():
    with pytest.raises(ValueError, match=r"stages.sft: takes a policy from 'nope'"):
        _pipeline(Path("/tmp"), stages=(SFTStage(name="sft", policy="nope", curated=4, sft=SFT),))
    with pytest.raises(ValueError, match=r"takes a dataset from 'base', which is not an earlier rejection"):
        _pipeline(Path("/tmp"), stages=(
            PretrainStage(name="base", model=TINY, pretrain=PretrainConfig(steps=1)),
            SFTStage(name="sft", policy="base", datasets=("base",), sft=SFT)))
