"""Hugging Face round trips and every loader error, each with its message."""

import json
import shutil

import numpy as np
import pytest

from grpo_jax import hf_io
from grpo_jax import model as M
from grpo_jax.hf_io import CheckpointError
from hf_models import char_tokenizer, torch_logits


def _tokens():
    rng = np.random.default_rng(0)
    t = rng.integers(4, 128, (2, 12))
    m = np.ones_like(t)
    m[1, :4] = 0
    return t, m


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", {}),
    ("qwen3", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0,
                                "original_max_position_embeddings": 16, "attention_factor": 1.2}}),
])
def test_export_reloads_in_transformers_with_identical_logits(hf_dir_factory, tmp_path, arch,
                                                              overrides):
    import transformers

    d, _ = hf_dir_factory(arch, initializer_range=0.1, **overrides)
    cfg, params = hf_io.load(d)
    out = hf_io.save(params, cfg, tmp_path / "export", tokenizer=hf_io.load_tokenizer(d))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = _tokens()
    ours = np.asarray(M.forward(params, tokens, cfg, mask))
    theirs = torch_logits(reloaded, tokens, mask)
    np.testing.assert_array_equal(theirs[mask.astype(bool)].shape, ours[mask.astype(bool)].shape)
    np.testing.assert_allclose(theirs[mask.astype(bool)], ours[mask.astype(bool)], atol=1e-4)
    cfg2, params2 = hf_io.load(out)  # and our own loader reads it back bit for bit
    assert cfg2 == cfg
    for a, b in zip(jax_leaves(params), jax_leaves(params2)):
        np.testing.assert_array_equal(a, b)
    assert hf_io.load_tokenizer(out)("12+3").input_ids == hf_io.load_tokenizer(d)("12+3").input_ids


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sharded_safetensors_with_index(hf_dir_factory, tmp_path):
    d, _ = hf_dir_factory("qwen2")
    cfg, params = hf_io.load(d)
    out = hf_io.save(params, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (out / "model.safetensors").exists()
    _, params2 = hf_io.load(out)
    for a, b in zip(jax_leaves(params), jax_leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_bf16_checkpoint_is_cast_on_load(tmp_path):
    import jax

    from grpo_jax.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, param_dtype="bfloat16")
    params = M.init_params(cfg, jax.random.key(0))
    hf_io.save(params, cfg, tmp_path)
    cfg_b, p_b = hf_io.load(tmp_path)
    assert cfg_b.param_dtype == "bfloat16" and p_b["embed"].dtype == np.dtype("bfloat16")
    cfg_f, p_f = hf_io.load(tmp_path, param_dtype="float32")
    assert p_f["embed"].dtype == np.float32
    np.testing.assert_array_equal(p_f["embed"], np.asarray(params["embed"]).astype(np.float32))


def _copy(d, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(d, dst)
    return dst


def _edit_config(d, **changes):
    conf = json.loads((d / "config.json").read_text())
    conf.update(changes)
    (d / "config.json").write_text(json.dumps(conf))


def test_unsupported_architecture_lists_the_supported(hf_dir_factory, tmp_path):
    d = _copy(hf_dir_factory("qwen2")[0], tmp_path)
    _edit_config(d, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(CheckpointError, match=r"model_type='gpt_neox'.*supported: qwen2, qwen3, llama"):
        hf_io.load(d)


def _hf_llama(**kw):
    return {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 4096} | kw


def test_rope_settings_missing_from_an_older_config_are_filled_as_transformers_does():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    # llama3 without its original context length: max_position_embeddings (not our 8192 default)
    sc = hf_io.config_from_hf(_hf_llama(rope_scaling=llama3)).rope_scaling
    assert (sc.kind, sc.original_max_position_embeddings) == ("llama3", 4096)
    # a top-level original_max_position_embeddings wins over the scaling's own
    sc = hf_io.config_from_hf(_hf_llama(
        original_max_position_embeddings=512,
        rope_scaling=llama3 | {"original_max_position_embeddings": 1024})).rope_scaling
    assert sc.original_max_position_embeddings == 512
    # YaRN without a factor: the context's growth; old-style "type" key; theta from rope_parameters
    cfg = hf_io.config_from_hf(_hf_llama(rope_parameters={
        "type": "yarn", "original_max_position_embeddings": 1024, "rope_theta": 1e6}))
    assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor, cfg.rope_theta) == ("yarn", 4.0, 1e6)
    assert (cfg.rope_scaling.beta_fast, cfg.rope_scaling.attention_factor) == (32.0, None)
    assert M.rope_attention_scale(cfg) == pytest.approx(0.1 * np.log(4.0) + 1)
    with pytest.raises(CheckpointError, match=r"'dynamic' is not supported; supported: default, "
                                              r"llama3, linear, yarn"):
        hf_io.config_from_hf(_hf_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    no_length = {k: v for k, v in _hf_llama().items() if k != "max_position_embeddings"}
    with pytest.raises(CheckpointError, match=r"yarn: neither factor nor .*add the factor"):
        hf_io.config_from_hf(no_length | {"rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match=r"rope_scaling.beta_fast: must exceed beta_slow"):
        hf_io.config_from_hf(_hf_llama(rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                     "beta_fast": 1.0, "beta_slow": 2.0}))


def test_missing_and_unexpected_tensors_are_named(hf_dir_factory, tmp_path):
    d = _copy(hf_dir_factory("qwen2")[0], tmp_path)
    _edit_config(d, num_hidden_layers=3)  # the file has 2 layers
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model\.layers\.2\.input_layernorm"):
        hf_io.load(d)
    _edit_config(d, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: \['model\.layers\.1\."):
        hf_io.load(d)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dir_factory, tmp_path):
    d = _copy(hf_dir_factory("qwen2")[0], tmp_path)
    _edit_config(d, intermediate_size=100)  # file has 96
    with pytest.raises(CheckpointError,
                       match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\), "
                             r"config\.json implies \(100, 64\)"):
        hf_io.load(d)


def test_missing_files(tmp_path, hf_dir_factory):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        hf_io.load(tmp_path)
    d = _copy(hf_dir_factory("qwen2")[0], tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        hf_io.load(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        hf_io.load(tmp_path / "nope" / "here")


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, hf_dir_factory):
    d = _copy(hf_dir_factory("qwen2")[0], tmp_path)
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens but the model's vocabulary has 50"):
        hf_io.load_tokenizer(d, vocab_size=50)


def test_custom_tokenizer_json_is_not_replaced_by_the_config_class(tmp_path, hf_dir_factory):
    """A qwen2 directory whose tokenizer_config names Qwen2Tokenizer but whose tokenizer.json is a
    custom character tokenizer: AutoTokenizer's class would tokenize differently."""
    import transformers

    d = _copy(hf_dir_factory("qwen2")[0], tmp_path)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "Qwen2Tokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    text = "12+3 = 15"
    want = char_tokenizer()(text).input_ids
    auto = transformers.AutoTokenizer.from_pretrained(d)(text).input_ids
    assert auto != want  # the trap this loader exists for (if transformers fixes it, fine too)
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (d / "chat_template.jinja").write_text(template)
    tok = hf_io.load_tokenizer(d, vocab_size=128)
    assert tok(text).input_ids == want
    assert tok.eos_token == "</s>" and tok.pad_token_id == 0
    assert tok.chat_template == template  # kept by the tokenizer.json fallback too


def test_tokenizer_loads_without_importing_torch(tmp_path, hf_dir_factory):
    """The class tokenizer_config.json names is loaded directly: AutoTokenizer would import
    torch (+216 MiB resident) through transformers' config code, in a process that runs JAX."""
    import subprocess
    import sys

    d = hf_dir_factory("qwen2")[0]
    code = ("import sys; from grpo_jax import hf_io; "
            f"tok = hf_io.load_tokenizer({str(d)!r}); "
            "print(type(tok).__name__, 'torch' in sys.modules, tok('12+3 = 15').input_ids)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    name, torch_imported, ids = out.stdout.strip().split(" ", 2)
    assert torch_imported == "False" and name == "TokenizersBackend"  # the declared class
    assert ids == str(char_tokenizer()("12+3 = 15").input_ids)
