"""Hugging Face interop: parity with transformers' PyTorch models, save/load round trips, errors.

Parity tests build tiny randomly initialised transformers models (no downloads), save them with
`save_pretrained`, load them with `load_hf` and compare rewards and hidden states. All parameters
are perturbed away from their init values (norm scales 1, biases 0), so that a mis-mapped norm or
bias cannot go unnoticed, and weights are large enough to make attention peaked.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import PAD, VOCAB, tokens

from jaxpref.models import hf_io
from jaxpref.models import reward_model as rm
from jaxpref.models.config import ModelConfig

TINY_HF = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=96,
  max_position_embeddings=32,
  initializer_range=0.2,
  pad_token_id=PAD,
  attn_implementation="eager",
)
LLAMA3 = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8,
}
# name -> (transformers config class, extra config kwargs)
VARIANTS = {
  "neox_parallel_rot0.25": ("GPTNeoXConfig", dict(use_parallel_residual=True, rotary_pct=0.25)),
  "neox_sequential_rot1.0": (
    "GPTNeoXConfig",
    dict(use_parallel_residual=False, rotary_pct=1.0, rotary_emb_base=50),
  ),
  "llama_mha": ("LlamaConfig", dict(rope_theta=100.0)),
  "llama_gqa_linear": (
    "LlamaConfig",
    dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
  ),
  "llama_gqa_llama3_bias": (
    "LlamaConfig",
    dict(
      num_key_value_heads=1,
      attention_bias=True,
      mlp_bias=True,
      rope_theta=500.0,
      rope_scaling=LLAMA3,
    ),
  ),
  # Sequences up to 14 tokens, beyond max_position_embeddings=8, so the NTK scaling kicks in.
  "llama_gqa_dynamic": (
    "LlamaConfig",
    dict(
      num_key_value_heads=2,
      max_position_embeddings=8,
      rope_theta=100.0,
      rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    ),
  ),
}
LENGTHS = [10, 3, 7, 1]
DYNAMIC_LENGTHS = [14, 9, 12, 3]


@functools.partial(jax.jit, static_argnums=0, static_argnames="output_hidden_states")
def _apply(cfg, params, ids, mask, output_hidden_states=True):
  # Full float32 matmuls also on GPU/TPU, whose default float32 precision is lower.
  with jax.default_matmul_precision("highest"):
    return rm.apply(cfg, params, ids, mask, output_hidden_states=output_hidden_states)


# ----------------------------------------------------------------------------------------------
# Building transformers models.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  torch.set_num_threads(1)
  return torch


def _hf_model(
  torch, config_cls: str, task: str = "ForSequenceClassification", seed: int = 0, **overrides
):
  import transformers

  kwargs = TINY_HF | overrides
  if task == "ForSequenceClassification":
    kwargs["num_labels"] = 1
  config = getattr(transformers, config_cls)(**kwargs)
  model_cls = getattr(transformers, config_cls.removesuffix("Config") + task)
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


def _save(model, path: Path, **kwargs) -> Path:
  model.save_pretrained(str(path), **kwargs)
  return path


def _hf_run(torch, model, ids, mask):
  """transformers outputs with jaxpref's position convention (0 at each first real token)."""
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(positions),
      output_hidden_states=True,
    )
  hidden = np.stack([h.float().numpy() for h in out.hidden_states])
  logits = out.logits[:, 0].float().numpy() if out.logits.ndim == 2 else None
  return logits, hidden


def _reset_dynamic_rope(model):
  # transformers caches the longest length its dynamic RoPE has seen; start each sequence afresh.
  rotary = getattr(model, model.base_model_prefix).rotary_emb
  rotary.inv_freq = rotary.original_inv_freq.clone()
  rotary.max_seq_len_cached = rotary.original_max_seq_len


def _hf_unpadded(torch, model, ids, mask):
  """transformers run on each sequence alone, without padding."""
  rewards, hidden = [], []
  for row_ids, row_mask in zip(ids, mask):
    real = row_ids[row_mask > 0][None]
    _reset_dynamic_rope(model)
    r, h = _hf_run(torch, model, real, np.ones_like(real))
    rewards.append(None if r is None else r[0])
    hidden.append(h[:, 0])
  return rewards, hidden


def _max_err_on_realtokens(hidden_nbld, hf_hidden_nbld, mask_bl):
  return float(np.abs((hidden_nbld - hf_hidden_nbld) * mask_bl[None, :, :, None]).max())


# ----------------------------------------------------------------------------------------------
# Parity.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sequence_classification_parity(torch, tmp_path, variant):
  config_cls, overrides = VARIANTS[variant]
  model = _hf_model(torch, config_cls, **overrides)
  cfg, params = hf_io.load_hf(_save(model, tmp_path))
  assert cfg.pooling == "last" and cfg.pad_token_id == PAD
  dynamic = "dynamic" in variant
  lengths = DYNAMIC_LENGTHS if dynamic else LENGTHS
  length = max(lengths)
  right_ids, right_mask = tokens(lengths, length, left=False)
  left_ids, left_mask = tokens(lengths, length, left=True)
  ids, mask = np.concatenate([right_ids, left_ids]), np.concatenate([right_mask, left_mask])
  out = _apply(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  rewards, hidden = np.asarray(out["rewards"]), np.asarray(out["hidden_states"])
  assert np.isfinite(hidden).all()

  # Against transformers on each sequence alone (no padding at all), both padding sides.
  hf_rewards, hf_hidden = _hf_unpadded(torch, model, right_ids, right_mask)
  for b, n in enumerate(lengths):
    for row, offset in ((b, 0), (b + len(lengths), length - n)):
      assert abs(rewards[row] - hf_rewards[b]) < 1e-4, (variant, row)
      np.testing.assert_allclose(
        hidden[:, row, offset : offset + n], hf_hidden[b], atol=1e-4, rtol=1e-4
      )
  if dynamic:
    return  # transformers' dynamic RoPE depends on the whole batch; jaxpref's per sequence.
  # Against transformers on the same padded batch (mixed right and left padding).
  hf_rewards, hf_hidden = _hf_run(torch, model, ids, mask)
  np.testing.assert_allclose(rewards, hf_rewards, atol=1e-4)
  assert hidden.shape == hf_hidden.shape
  assert _max_err_on_realtokens(hidden, hf_hidden, mask) < 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_backbone_and_fresh_head(torch, tmp_path, tied, caplog):
  model = _hf_model(
    torch, "LlamaConfig", task="ForCausalLM", num_key_value_heads=2, tie_word_embeddings=tied
  )
  path = _save(model, tmp_path)
  with caplog.at_level(logging.WARNING, logger="jaxpref"):
    cfg, params = hf_io.load_hf(path, head_seed=3)
  assert not caplog.records  # lm_head (untied) is expected and not reported as unused
  ids, mask = tokens(LENGTHS, max(LENGTHS), left=True)
  out = _apply(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  _, hf_hidden = _hf_run(torch, model, ids, mask)
  assert _max_err_on_realtokens(np.asarray(out["hidden_states"]), hf_hidden, mask) < 1e-4
  # The head is fresh: normal(0, initializer_range), reproducible from the seed.
  kernel = params["score"]["kernel"]
  assert kernel.shape == (cfg.hidden_size, 1)
  assert 0.1 < kernel.std() < 0.3  # initializer_range=0.2
  np.testing.assert_array_equal(hf_io.load_hf(path, head_seed=3)[1]["score"]["kernel"], kernel)
  assert not np.array_equal(hf_io.load_hf(path, head_seed=4)[1]["score"]["kernel"], kernel)


@pytest.mark.parity
def test_base_model_and_sharded_checkpoint(torch, tmp_path):
  model = _hf_model(torch, "GPTNeoXConfig", task="Model", rotary_pct=0.5)
  single = _save(model, tmp_path / "single")
  sharded = _save(model, tmp_path / "sharded", max_shard_size="40KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("*.safetensors"))) > 1
  cfg, params = hf_io.load_hf(single)
  cfg_sharded, params_sharded = hf_io.load_hf(sharded)
  assert cfg_sharded == cfg
  jax.tree.map(np.testing.assert_array_equal, params_sharded, params)
  ids, mask = tokens(LENGTHS, max(LENGTHS), left=False)
  out = _apply(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  with torch.no_grad():
    hf_out = model(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True
    )
  hf_hidden = np.stack([h.numpy() for h in hf_out.hidden_states])
  assert _max_err_on_realtokens(np.asarray(out["hidden_states"]), hf_hidden, mask) < 1e-4


@pytest.mark.parity
def test_bfloat16_is_close(torch, tmp_path):
  model = _hf_model(torch, "LlamaConfig", num_key_value_heads=2)
  path = _save(model, tmp_path)
  ids, mask = tokens(LENGTHS, max(LENGTHS), left=True)
  want, _ = _hf_run(torch, model, ids, mask)
  hf_bf16, _ = _hf_run(torch, model.to(torch.bfloat16), ids, mask)
  cfg, params = hf_io.load_hf(path, dtype="bfloat16", param_dtype="bfloat16")
  assert params["backbone"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  got = np.asarray(
    _apply(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))["rewards"]
  )
  # As close to the float32 rewards as transformers' own bfloat16 run, within a margin.
  hf_err = np.abs(hf_bf16 - want).max()
  assert np.abs(got - want).max() <= max(3 * hf_err, 0.02 * np.abs(want).max())


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["neox_parallel_rot0.25", "llama_gqa_llama3_bias"])
def test_save_hf_round_trip_through_transformers(torch, tmp_path, variant):
  import tokenizers
  import transformers

  config_cls, overrides = VARIANTS[variant]
  model = _hf_model(torch, config_cls, **overrides)
  cfg, params = hf_io.load_hf(_save(model, tmp_path / "orig"))
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[PAD]": 0, "a": 1}, "[PAD]"))
  out_dir = hf_io.save_hf(tmp_path / "saved", cfg, params, tokenizer, max_shard_bytes=100_000)
  assert (out_dir / "tokenizer.json").is_file()
  assert json.loads((out_dir / "config.json").read_text())["pad_token_id"] == PAD
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
    str(out_dir), attn_implementation="eager"
  ).eval()
  ids, mask = tokens(LENGTHS, max(LENGTHS), left=True)
  want, _ = _hf_run(torch, model, ids, mask)
  got, _ = _hf_run(torch, reloaded, ids, mask)
  np.testing.assert_allclose(got, want, atol=1e-6)
  cfg2, params2 = hf_io.load_hf(out_dir)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


# ----------------------------------------------------------------------------------------------
# save_hf / load_hf without transformers, and errors.
# ----------------------------------------------------------------------------------------------

JAX_TINY = ModelConfig(
  arch="llama",
  vocab_size=VOCAB,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  intermediate_size=48,
  hidden_act="silu",
  pad_token_id=PAD,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  init = jax.jit(rm.init_params, static_argnums=0)
  params = jax.tree.map(np.asarray, init(JAX_TINY, jax.random.key(0)))
  path = hf_io.save_hf(tmp_path_factory.mktemp("ckpt") / "rm", JAX_TINY, params)
  return path, params


def _copy(src: Path, dst: Path) -> Path:
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _edit_config(path: Path, **changes) -> None:
  config = json.loads((path / "config.json").read_text())
  config |= changes
  (path / "config.json").write_text(json.dumps(config))


def test_save_then_load_is_identity(saved):
  path, params = saved
  cfg, loaded = hf_io.load_hf(path)
  assert cfg == JAX_TINY
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_save_hf_refuses_what_transformers_would_score_differently(tmp_path, saved):
  _, params = saved
  cfg = JAX_TINY.replace(pooling="mean")
  with pytest.raises(hf_io.CheckpointError, match="pooling='mean'"):
    hf_io.save_hf(tmp_path / "x", cfg, params)
  hf_io.save_hf(tmp_path / "x", cfg, params, strict=False)
  assert hf_io.load_hf(tmp_path / "x")[0].pooling == "mean"
  # Llama-family configs cannot say that only part of each head is rotated.
  with pytest.raises(hf_io.CheckpointError, match="rotary_pct=0.25"):
    hf_io.save_hf(tmp_path / "y", JAX_TINY.replace(rotary_pct=0.25), params)


def test_save_hf_tokenizer_dir_and_pad_fallback(tmp_path, saved, caplog):
  _, params = saved
  tokenizer_dir = tmp_path / "tok"
  tokenizer_dir.mkdir()
  (tokenizer_dir / "tokenizer.json").write_text("{}")
  (tokenizer_dir / "tokenizer_config.json").write_text("{}")
  cfg = JAX_TINY.replace(pad_token_id=None, eos_token_id=2)
  with caplog.at_level(logging.WARNING, logger="jaxpref"):
    out = hf_io.save_hf(tmp_path / "rm", cfg, params, tokenizer_dir)
  assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in out.iterdir()}
  assert json.loads((out / "config.json").read_text())["pad_token_id"] == 2
  assert "eos_token_id=2" in caplog.text
  assert hf_io.save_hf(tmp_path / "rm2", cfg, params, pad_token_id=5) == tmp_path / "rm2"
  assert json.loads((tmp_path / "rm2" / "config.json").read_text())["pad_token_id"] == 5
  with pytest.raises(hf_io.CheckpointError, match="no tokenizer files"):
    hf_io.save_hf(tmp_path / "rm3", cfg, params, tmp_path / "rm2" / "missing")


@pytest.mark.parametrize(
  "case, match",
  [
    ("missing_dir", "does not exist"),
    ("hub_id", "hf download EleutherAI/pythia-1b"),
    ("no_config", "no config.json"),
    ("bad_json", r"config.json:1: invalid JSON"),
    ("no_weights", "no model.safetensors"),
    ("bin_weights", "pytorch_model.bin"),
    ("model_type", "unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"),
    ("class", "unsupported architecture 'LlamaForTokenClassification'"),
    ("num_labels", "num_labels=2"),
    ("shape", r"model.layers.0.mlp.gate_proj.weight .*shape \(48, 32\), expected \(50, 32\)"),
    ("missing_shard", "model-00002-of-00002.safetensors, which is missing"),
    ("override", "unknown model config field"),
  ],
)
def test_load_errors_are_one_line(tmp_path, monkeypatch, saved, case, match):
  monkeypatch.chdir(tmp_path)
  path = _copy(saved[0], tmp_path / "ckpt")
  target, kwargs = path, {}
  if case == "missing_dir":
    target = tmp_path / "nope"
  elif case == "hub_id":
    target = "EleutherAI/pythia-1b"
  elif case == "no_config":
    (path / "config.json").unlink()
  elif case == "bad_json":
    (path / "config.json").write_text("{nope")
  elif case in ("no_weights", "bin_weights"):
    (path / "model.safetensors").unlink()
    if case == "bin_weights":
      (path / "pytorch_model.bin").write_bytes(b"")
  elif case == "model_type":
    _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  elif case == "class":
    _edit_config(path, architectures=["LlamaForTokenClassification"])
  elif case == "num_labels":
    _edit_config(path, id2label={"0": "A", "1": "B"})
  elif case == "shape":
    _edit_config(path, intermediate_size=50)
  elif case == "missing_shard":
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
  elif case == "override":
    kwargs = {"hiden_size": 3}
  with pytest.raises(hf_io.CheckpointError, match=match) as info:
    hf_io.load_hf(target, **kwargs)
  assert "\n" not in str(info.value)
