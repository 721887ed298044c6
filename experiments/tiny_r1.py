"""DeepSeek-R1's story in miniature on a CPU: base -> R1-Zero, base -> R1 (four stages), and
distillation into a smaller student.

The base model is pretrained on synthetic arithmetic text whose reasoning is written in words,
each step in one of two scripts for the same words (Latin "4 times 5 is 20" or a Greek
transliteration "4 τιμεσ 5 ισ 20"), switching from step to step: the language mixing of
DeepSeek-R1-Zero. Then, as in the paper (SPEC.md section 4):

  r1_zero       GRPO from the base with accuracy + format rewards
  cold_start    SFT of the base on a small curated set (correct, R1 format, Latin reasoning)
  reasoning_rl  GRPO from cold_start with accuracy + format + language-consistency rewards
  rejection     samples of reasoning_rl on training prompts, kept when correct, well formatted,
                in one script and not repetitive
  sft_r1        SFT of the base on the accepted samples plus the curated set
  r1            GRPO from sft_r1 for all scenarios: rule rewards plus a model-based reward
                (the cold-start model as a yes/no judge)
  distill_data  samples of r1 (the teacher), filtered the same way
  student       SFT of a smaller pretrained base on the teacher's samples (distillation)
  student_cold_start_only  the same student base, SFT on the curated set only (the control)
  report        pass@1, cons@4, format rate, language consistency and length of each model

Run:    grpo-jax run experiments/tiny_r1.py            (one stage: --stage NAME)
Expect: (held-out, 256 problems x 4 samples at temperature 0.6, top-p 0.95; 2026-11-22, 2-core
        AMD EPYC shared with other jobs, jax 0.10.2: 13.3 min; docs/tiny_r1/report.md)
        model                     pass@1  cons@4  format  language  length
        base                       0.064   0.207   0.125     0.710    39.5
        r1_zero                    0.305   0.305   0.989     0.627    37.9
        r1                         0.558   0.586   1.000     1.000    38.2
        student (distilled)        0.144   0.129   0.990     1.000    38.2
        student_cold_start_only    0.056   0.051   0.835     0.996    37.5
"""

from grpo_jax.config import (DataConfig, EvalConfig, Experiment, GRPOConfig, LogConfig, ModelConfig,
                             ModelSource, OptimConfig, PretrainConfig, RewardConfig, SamplerConfig)
from grpo_jax.pipeline import (EvalStage, GRPOStage, Pipeline, PretrainStage, RejectionStage,
                               SFTStage, StageModelReward)
from grpo_jax.rejection import RejectionConfig
from grpo_jax.sft import SFTConfig

MAX_NEW = 64
BASE = ModelConfig(arch="qwen2", vocab_size=128, hidden_size=128, intermediate_size=384,
                   num_layers=3, num_heads=4, num_kv_heads=2, attention_bias=True,
                   tie_word_embeddings=True, max_position_embeddings=256)
STUDENT = ModelConfig(arch="qwen2", vocab_size=128, hidden_size=64, intermediate_size=192,
                      num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True,
                      tie_word_embeddings=True, max_position_embeddings=256)
CORPUS = dict(template_fraction=0.2, words=True, second_script=0.5)


def grpo(steps: int, rewards: tuple, lr: float = 5e-4) -> Experiment:
    return Experiment(
        seed=0, steps=steps, prompts_per_step=16, model=ModelSource(init=BASE),
        sampler=SamplerConfig(max_new_tokens=MAX_NEW, temperature=1.0, prompt_bucket=16),
        grpo=GRPOConfig(group_size=8, kl_coef=0.04, kl_estimator="k3"),
        optim=OptimConfig(lr=lr, warmup_steps=5, clip_norm=1.0),
        rewards=RewardConfig(weights=rewards),
        eval=EvalConfig(every=0, samples=2, batch_prompts=64),
        log=LogConfig(samples_every=10, num_samples=4))


def sft(epochs: int, lr: float, batch_size: int = 16) -> SFTConfig:
    return SFTConfig(epochs=epochs, batch_size=batch_size, max_len=128,
                     optim=OptimConfig(lr=lr, warmup_steps=5, schedule="cosine", clip_norm=1.0))


RULES = (("accuracy", 1.0), ("format", 0.3))
LANGUAGE = RULES + (("language", 0.2),)  # r_acc + 0.3 r_fmt + 0.2 r_lang (SPEC.md section 3)
# The all-scenarios stage's model-based reward: the cold-start model asked whether a response is
# right, p(Y) / (p(Y) + p(N)). A model this small was never taught to judge, so in the miniature
# this reward exercises the mechanics (batched, jitted scoring beside the rule rewards) with a
# small weight; it carries little signal.
JUDGE_PROMPT = "User: {question} Assistant:{response} User: Is this right? Assistant: "
FILTER = RejectionConfig(samples_per_prompt=2, temperature=0.6, top_p=0.95, max_new_tokens=MAX_NEW)

PIPELINE = Pipeline(
    seed=0,
    data=DataConfig(task="arithmetic",
                    task_args='{"digits": [1, 1], "operators": "+-", "num_operands": [2, 3]}',
                    template="short", max_prompt_tokens=48, eval_problems=256),
    eval=EvalConfig(samples=4, temperature=0.6, top_p=0.95, batch_prompts=64),
    stages=(
        PretrainStage(name="base", model=BASE, pretrain=PretrainConfig(
            steps=1000, batch_size=32, lr=3e-3, **CORPUS)),
        PretrainStage(name="student_base", model=STUDENT, pretrain=PretrainConfig(
            steps=600, batch_size=32, lr=3e-3, **CORPUS)),
        GRPOStage(name="r1_zero", policy="base", experiment=grpo(60, RULES)),
        SFTStage(name="cold_start", policy="base", curated=64, sft=sft(epochs=4, lr=1e-3)),
        GRPOStage(name="reasoning_rl", policy="cold_start", experiment=grpo(40, LANGUAGE)),
        RejectionStage(name="rejection", policy="reasoning_rl", prompts=1024, rejection=FILTER),
        SFTStage(name="sft_r1", policy="base", curated=64, datasets=("rejection",),
                 sft=sft(epochs=2, lr=1e-3)),
        GRPOStage(name="r1", policy="sft_r1", experiment=grpo(30, LANGUAGE + (("judge", 0.1),), lr=1e-4),
                  model_rewards=(StageModelReward(name="judge", stage="cold_start", options=(
                      ("prompt_template", JUDGE_PROMPT), ("yes_tokens", ("Y",)),
                      ("no_tokens", ("N",)), ("max_len", 160))),)),
        RejectionStage(name="distill_data", policy="r1", prompts=2048, rejection=FILTER),
        SFTStage(name="student", policy="student_base", datasets=("distill_data",),
                 sft=sft(epochs=4, lr=2e-3)),
        SFTStage(name="student_cold_start_only", policy="student_base", curated=64,
                 sft=sft(epochs=4, lr=2e-3)),
        EvalStage(name="report", policies=(
            ("base", "base"), ("r1_zero", "r1_zero"), ("r1", "r1"), ("student", "student"),
            ("student_cold_start_only", "student_cold_start_only"))),
    ),
)
