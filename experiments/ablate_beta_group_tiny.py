"""Ablation of the KL coefficient beta and the group size G on the tiny R1-Zero task, 2 seeds.

tiny_r1_zero.py, shortened so that all 12 runs (beta in {0, 0.01, 0.04} x G in {4, 8} x 2 seeds)
fit about 20 minutes on 2 CPU cores: 400 pretraining steps instead of 1000, 40 GRPO steps instead
of 80 (the tiny run gains most of its pass@1 in its first 20 steps), N = 64 completions per step
instead of 128, and a held-out set of 128 problems x 4 samples evaluated every 10 steps.

hold="completions": every run samples and trains on the same N = B x G = 64 completions per step
(G = 4 -> 16 prompts, G = 8 -> 8 prompts), so at any step the settings have spent the same
sampling and update compute and taken the same number of optimizer steps, and the G comparison
asks the question a fixed budget poses: a few prompts with wide groups (a better baseline per
prompt) or more prompts with narrow ones. With hold="prompts" the G = 8 runs would sample twice
as much per step, and their curves against steps would mix the effect of G with that of a larger
batch.

Sizing, from one probe run of the first setting for 2 GRPO steps (2026-11-22, 2 shared CPU cores
under a load average of ~7, jax 0.10.2): after 400 pretraining steps the base model's held-out
pass@1 is 0.041 and its format rate 0.135 (1000 steps: 0.099 and 0.181), enough for the format
reward to have something to reinforce; pretraining, compilation and two evaluations took 89 s of
user CPU time.

Vectorized (the sweep's default for this 0.61M-parameter model, grpo_jax/vectorized.py): the 12
runs train as 2 batched programs of 6 runs (G = 4 and G = 8; beta and the seed vary inside a
program), and each seed is pretrained once instead of six times. Estimate from the whole sweep
run for 3 GRPO steps (`--set steps=3`: 4.1 min wall on 2 CPU cores shared with other jobs, load
average ~3): pretraining 79 s per seed, the step-0 evaluations 11 s for both seeds, a group's
first step (compilation) 18-20 s, then 2.0-2.3 s per step for all 6 runs of a group and 0.9 s
per later evaluation of a run; the 40 steps x 2 groups with evaluations every 10 steps then take
about 7.5 minutes (10 with longer completions or a busier machine). With --no-vectorize every
run pretrains for itself: about 20 minutes.

Run:    grpo-jax sweep experiments/ablate_beta_group_tiny.py
        grpo-jax compare runs/ablate_beta_group_tiny-sweep
Expect: 8.2 min for the 12 runs, vectorized (2026-11-22, 2 CPU cores shared with another job,
        jax 0.10.2); final held-out pass@1 0.033-0.097 per setting (beta 0.04 highest), format
        rate 0.97-1.00 in every setting; table and picture in docs/ablate_beta_group_tiny/.
"""

import dataclasses
import importlib.util
from pathlib import Path

from grpo_jax.sweep import Sweep

_spec = importlib.util.spec_from_file_location("tiny_r1_zero", Path(__file__).with_name("tiny_r1_zero.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
TINY = _tiny.CONFIG

CONFIG = dataclasses.replace(
    TINY,
    steps=40,
    prompts_per_step=8,  # x G = 8: N = 64 completions per step, held for every G by the sweep
    pretrain=dataclasses.replace(TINY.pretrain, steps=400),
    data=dataclasses.replace(TINY.data, eval_problems=128),
    eval=dataclasses.replace(TINY.eval, every=10),
)

SWEEP = Sweep(grid=(("grpo.kl_coef", (0.0, 0.01, 0.04)), ("grpo.group_size", (4, 8))),
              seeds=2, hold="completions")
