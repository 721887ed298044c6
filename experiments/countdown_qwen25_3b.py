"""R1-Zero on Countdown with Qwen2.5-3B (base) in the TinyZero setting.

Memory (`grpo-jax plan experiments/countdown_qwen25_3b.py --device h100 --mesh data=1,fsdp=2,tensor=1`):
float32 weights + AdamW + reference do not fit one 80 GB GPU (107 GiB planned); two GPUs with
FSDP do (55 GiB each), as does one GPU with --model.param-dtype bfloat16 --optim.micro-batches 16.

Run:    grpo-jax run experiments/countdown_qwen25_3b.py --mesh.axes data 1 fsdp -1 tensor 1
Expect: not run yet. TinyZero reports ~60% accuracy in under 10 h on one 80 GB GPU (0.5B fails
        to learn); fill in the measured result, hardware and wall time after the first real run.
"""

from grpo_jax.config import (DataConfig, EvalConfig, Experiment, GRPOConfig, ModelSource,
                             OptimConfig, RewardConfig, SamplerConfig)

CONFIG = Experiment(
    seed=0,
    steps=300,
    prompts_per_step=32,
    model=ModelSource(path="Qwen/Qwen2.5-3B", param_dtype="float32", compute_dtype="bfloat16",
                      remat=True, logits_chunk=128),
    data=DataConfig(task="countdown", task_args='{"num_range": [1, 99], "count": [3, 4]}',
                    template="r1_zero", max_prompt_tokens=256, eval_problems=512),
    sampler=SamplerConfig(max_new_tokens=1024, temperature=1.0, prompt_bucket=64),
    grpo=GRPOConfig(group_size=8, kl_coef=0.001, kl_estimator="k3"),
    optim=OptimConfig(lr=1e-6, warmup_steps=10, clip_norm=1.0, micro_batches=8),
    rewards=RewardConfig(weights=(("countdown", 1.0),)),
    eval=EvalConfig(every=50, samples=4, temperature=0.6, top_p=0.95, batch_prompts=64,
                    reward="countdown"),
)
