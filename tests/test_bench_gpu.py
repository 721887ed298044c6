"""scripts/bench_gpu.py: a CPU smoke run of the whole script (tiny shape, small sizes) and its
FLOP / byte formulas against values worked out by hand."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bg():
    return _load_script()


# The tiny shape: V 512, D 64, F 128, 2 layers, H 4, K 2, Hd 16, tied, q/k/v biases.
# Layer matmuls: 2 * (64*16*(2*4 + 2*2) + 3*64*128) = 2 * (12,288 + 24,576) = 73,728.
# All params: 2 * (12,288 + 16*(4 + 2*2) + 24,576 + 2*64) + 512*64 + 64 = 107,072.


def test_tiny_shape_counts(bg):
    cfg = bg.model_config("tiny", "bfloat16")
    assert bg.matmul_weights(cfg) == 73_728
    assert cfg.num_params == 107_072
    assert cfg.tie_word_embeddings and cfg.attention_bias and cfg.rope_theta == 1e6


def test_qwen_shapes_have_the_published_sizes(bg):
    # Qwen2.5-0.5B has 494,032,768 parameters, Qwen2.5-1.5B 1,543,714,304 (tied embeddings)
    assert bg.model_config("qwen2.5-0.5b", "bfloat16").num_params == 494_032_768
    assert bg.model_config("qwen2.5-1.5b", "bfloat16").num_params == 1_543_714_304


def test_train_flops_by_hand(bg):
    cfg = bg.model_config("tiny", "bfloat16")
    fl = bg.train_flops(cfg, prompts=2, rows=4, p=16, t=32)
    # tokens: each prompt once per group (2 * 16) + 4 completions of 32 = 160 (counting the
    # prompt once per row would give 192)
    assert fl["tokens"] == 160
    assert fl["dense"] == 6 * 73_728 * 160
    # causal pairs: 2 prompts * 16*17/2 + 4 rows * (32*16 + 32*33/2) = 272 + 4,160
    assert fl["attention_pairs"] == 4_432
    assert fl["attention"] == 12 * 2 * 4 * 16 * 4_432
    assert fl["unembed"] == 6 * 64 * 512 * 4 * 32
    assert fl["total"] == 70_778_880 + 6_807_552 + 25_165_824


def test_decode_roofline_by_hand(bg):
    cfg = bg.model_config("tiny", "bfloat16")
    r = bg.decode_roofline(cfg, rows=4, p=8, t=16, bandwidth=1e9, peak=1e12)
    assert r["mean_context"] == 8 + 24 + 0.5  # slots P + T + 1 .. P + 2T
    assert r["weight_bytes"] == 107_072 * 2  # tied: the embedding is read once, as unembedding
    # layers * (k, v) * rows * kv_heads * head_dim * 2 bytes per slot (no k/v factor: half)
    assert r["kv_bytes"] == 2 * 2 * 4 * 2 * 16 * 2 * 32.5
    assert r["roofline_s"] == pytest.approx((214_144 + 33_280) / 1e9)


def test_nominal_table(bg):
    assert bg.nominal("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert bg.nominal("NVIDIA H100 PCIe")[0] == 2.0e12
    assert bg.nominal("NVIDIA H200") == (4.8e12, 989e12)
    assert bg.nominal("cpu") == (None, None)


def test_cpu_smoke_run_writes_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--batch", "4", "--group", "2",
           "--prompt-len", "8", "--new-tokens", "32", "--train-batch", "4", "--train-group", "2",
           "--train-len", "48", "--train-prompt-len", "16", "--repeats", "5", "--inner", "3",
           "--bw-mib", "16", "--peak-n", "128", "--json", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1]) == r  # the last line is the same JSON
    assert r["shape"] == "tiny" and r["dtype"] == "bfloat16" and r["backend"] == "cpu"
    assert r["params"] == 107_072
    assert r["hbm_bandwidth"] > 0 and r["matmul_peak"] > 0
    assert r["nominal_bandwidth"] is None and r["train"]["mfu_nominal"] is None

    (d,) = r["decode"]
    assert (d["rows"], d["prompts"], d["new_tokens"]) == (4, 2, 32)
    assert d["call_s"]["64"] > d["call_s"]["32"] > 0
    assert d["step_s"] == pytest.approx((d["call_s"]["64"] - d["call_s"]["32"]) / 32)
    assert d["tokens_per_s"] == pytest.approx(4 / d["step_s"])
    assert d["roofline_s"] == pytest.approx((d["weight_bytes"] + d["kv_bytes"]) / r["hbm_bandwidth"])
    assert d["roofline_fraction"] == pytest.approx(d["roofline_s"] / d["step_s"])
    assert d["roofline_fraction"] > 0 and d["roofline_fraction_with_compute"] >= d["roofline_fraction"]

    t = r["train"]
    assert (t["rows"], t["prompts"], t["prompt_len"], t["completion_len"]) == (4, 2, 16, 32)
    assert t["flops"]["total"] == 102_752_256  # test_train_flops_by_hand
    assert t["step_s"] > 0 and 0 < t["mfu"]
    assert t["mfu"] == pytest.approx(t["flops"]["total"] / t["step_s"] / r["matmul_peak"])
    assert math.isfinite(t["loss"]) and t["tokens_per_s"] > 0
    assert set(r["targets"]) >= {"decode_met", "train_met"}
    assert r["targets"]["decode_met"] is None  # no batch >= 64 was run
