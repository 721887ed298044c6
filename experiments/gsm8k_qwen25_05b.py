"""GRPO on GSM8K with Qwen2.5-0.5B-Instruct, one GPU (DeepSeekMath-style settings, smaller G).

Data: GSM8K's train/test splits as local jsonl files (`question`, `answer` with "#### 42"), e.g.
written once with `datasets.load_dataset("openai/gsm8k", "main")` on a machine with a network.

Run:    grpo-jax run experiments/gsm8k_qwen25_05b.py --model.path Qwen/Qwen2.5-0.5B-Instruct \
            --data.task_args '{"path": "data/gsm8k/train.jsonl", "eval_path": "data/gsm8k/test.jsonl"}'
Expect: not run yet. Peers report 49.6% -> 54-57% greedy accuracy on one GPU (verl's table);
        fill in the measured result, hardware and wall time after the first real run.
"""

from grpo_jax.config import (DataConfig, EvalConfig, Experiment, GRPOConfig, ModelSource,
                             OptimConfig, RewardConfig, SamplerConfig)

CONFIG = Experiment(
    seed=0,
    steps=500,
    prompts_per_step=32,
    model=ModelSource(path="Qwen/Qwen2.5-0.5B-Instruct", param_dtype="float32",
                      compute_dtype="bfloat16", remat=True, logits_chunk=128),
    data=DataConfig(task="gsm8k",
                    task_args='{"path": "data/gsm8k/train.jsonl", "eval_path": "data/gsm8k/test.jsonl"}',
                    template="chat_r1", max_prompt_tokens=320, eval_problems=1319),
    sampler=SamplerConfig(max_new_tokens=512, temperature=1.0, prompt_bucket=64),
    grpo=GRPOConfig(group_size=8, kl_coef=0.04, kl_estimator="k3", adv_norm="group_std",
                    aggregation="seq_mean_token_mean"),
    optim=OptimConfig(lr=1e-6, warmup_steps=10, clip_norm=1.0, micro_batches=8),
    rewards=RewardConfig(weights=(("accuracy", 1.0), ("format", 0.3))),
    eval=EvalConfig(every=50, samples=4, temperature=0.6, top_p=0.95, batch_prompts=64),
)
