"""R1-Zero in miniature on a CPU: the embedded default experiment.

A tiny Qwen2-style model (character tokenizer, R1 tags as single tokens) is first pretrained for a
few hundred steps on synthetic arithmetic text in which only a minority of answers use the R1
template <think> ... </think> <answer> ... </answer>; it stands in for a base model. Then GRPO with
the accuracy + format rewards (r = r_acc + 0.3 r_fmt) in the User/Assistant template: the format
rate and held-out pass@1 rise, as in DeepSeek-R1-Zero.

Run:    grpo-jax run experiments/tiny_r1_zero.py
Expect: held-out pass@1 (256 problems x 4 samples, temperature 0.6, top-p 0.95) 0.081 -> 0.355,
        format rate 0.17 -> 1.00, greedy accuracy 0.051 -> 0.355; 115 s on 2 CPU cores
        (AMD EPYC, jax 0.10.2, 2026-11-22; docs/benchmarks.md).
"""

from grpo_jax.config import (DataConfig, EvalConfig, Experiment, GRPOConfig, LogConfig, ModelConfig,
                             ModelSource, OptimConfig, PretrainConfig, RewardConfig, SamplerConfig)

CONFIG = Experiment(
    seed=0,
    steps=80,
    prompts_per_step=16,
    model=ModelSource(init=ModelConfig(
        arch="qwen2", vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=3,
        num_heads=4, num_kv_heads=2, attention_bias=True, tie_word_embeddings=True,
        max_position_embeddings=256)),
    pretrain=PretrainConfig(steps=1000, batch_size=32, lr=3e-3, template_fraction=0.2),
    data=DataConfig(task="arithmetic",
                    task_args='{"digits": [1, 1], "operators": "+-", "num_operands": [2, 3]}',
                    template="short", max_prompt_tokens=48, eval_problems=256),
    sampler=SamplerConfig(max_new_tokens=40, temperature=1.0, prompt_bucket=16),
    grpo=GRPOConfig(group_size=8, kl_coef=0.04, kl_estimator="k3", adv_norm="group_std",
                    aggregation="seq_mean_token_mean"),
    optim=OptimConfig(lr=5e-4, warmup_steps=5, clip_norm=1.0),
    rewards=RewardConfig(weights=(("accuracy", 1.0), ("format", 0.3))),
    eval=EvalConfig(every=20, samples=4, temperature=0.6, top_p=0.95, batch_prompts=64),
    log=LogConfig(samples_every=10, num_samples=4),
)
