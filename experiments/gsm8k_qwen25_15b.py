"""GRPO on GSM8K with Qwen2.5-1.5B-Instruct: one 80 GB GPU, or a TPU VM (v5litepod-8, FSDP).

Data: GSM8K's train/test splits as local jsonl files (`question`, `answer` with "#### 42"), e.g.
written once with `datasets.load_dataset("openai/gsm8k", "main")` on a machine with a network;
on a TPU VM they travel with the copied checkout (data/ inside it).

Run (one GPU):
        bash scripts/run_gpu.sh -- grpo-jax run experiments/gsm8k_qwen25_15b.py \
            --model.path Qwen/Qwen2.5-1.5B-Instruct --run-dir runs/gsm8k_qwen25_15b
Run (TPU VM, from a laptop; docs/launch.md):
        python scripts/launch_tpu.py up --name grpo-v5e --zone us-west4-a \
            --accelerator-type v5litepod-8 --spot -- \
            grpo-jax run experiments/gsm8k_qwen25_15b.py \
            --run-dir /mnt/shared/runs/gsm8k_qwen25_15b --mesh.axes data 1 fsdp -1 tensor 1
Expect: not run yet. verl's table lists ~78% GSM8K accuracy for the 1.5B model (0.5B: 49.6% ->
        54-57% with GRPO); fill in the measured result, hardware and wall time after the first run.

Memory: float32 weights and AdamW moments (18 GB), the reference (6 GB), gradients and the KV cache
of 256 completions x 832 tokens (about 6 GB in bfloat16) fit one 80 GB GPU; a v5e chip has 16 GB,
so on TPU the training state is sharded over every chip (fsdp).
"""

from grpo_jax.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, GRPOConfig,
                             ModelSource, OptimConfig, RewardConfig, SamplerConfig)

CONFIG = Experiment(
    seed=0,
    steps=500,
    prompts_per_step=32,  # B; N = B * G = 256 completions per step
    model=ModelSource(path="Qwen/Qwen2.5-1.5B-Instruct", param_dtype="float32",
                      compute_dtype="bfloat16", remat=True, logits_chunk=128),
    data=DataConfig(task="gsm8k", task_args='{"path": "data/gsm8k/train.jsonl", '
                                            '"eval_path": "data/gsm8k/test.jsonl"}',
                    template="chat_r1", max_prompt_tokens=320, eval_problems=1319),
    sampler=SamplerConfig(max_new_tokens=512, temperature=1.0, prompt_bucket=64),
    grpo=GRPOConfig(group_size=8, kl_coef=0.04, kl_estimator="k3", adv_norm="group_std",
                    aggregation="seq_mean_token_mean"),
    optim=OptimConfig(lr=1e-6, warmup_steps=10, clip_norm=1.0, micro_batches=8),
    rewards=RewardConfig(weights=(("accuracy", 1.0), ("format", 0.3))),
    eval=EvalConfig(every=50, samples=4, temperature=0.6, top_p=0.95, batch_prompts=64),
    # A preempted spot VM loses at most 25 steps; one checkpoint (weights, moments, reference:
    # about 24 GB) is kept besides the one being written.
    checkpoint=CheckpointConfig(every=25, keep=1),
)
