"""Qwen2, Mistral, Qwen3, Qwen3-MoE, Gemma-2 and Gemma-3 against transformers, and through every
attention path.

Each family is a tiny random transformers `*ForSequenceClassification` (no downloads) with every
weight perturbed away from its init, sequences longer than the sliding windows and padding on
both sides. Checked: rewards and hidden states layer by layer (< 1e-4 in float32), the same
rewards from dense, blocked and packed attention, and `save_hf` -> transformers
`AutoModelForSequenceClassification` -> the same rewards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import LENGTHS, VARIANTS, hf_model, hf_run, tokens

from jaxpref.data import packing
from jaxpref.data.batch import PaddedBatch
from jaxpref.evaluation import scoring
from jaxpref.models import hf_io
from jaxpref.models import reward_model as rm


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  torch.set_num_threads(1)
  return torch


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, ids, mask):
  with jax.default_matmul_precision("highest"):
    return rm.apply(cfg, params, ids, mask, output_hidden_states=True)


def _padded_batch():
  right = tokens(LENGTHS, max(LENGTHS), left=False)
  left = tokens(LENGTHS, max(LENGTHS), left=True)
  return np.concatenate([right[0], left[0]]), np.concatenate([right[1], left[1]])


@pytest.mark.parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_transformers(torch, tmp_path, variant):
  model = hf_model(torch, variant)
  model.save_pretrained(str(tmp_path))
  cfg, params = hf_io.load_hf(tmp_path, attention="dense")
  assert cfg.arch == model.config.model_type.removesuffix("_text")
  ids, mask = _padded_batch()
  out = _apply(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  want, want_hidden = hf_run(torch, model, ids, mask)
  np.testing.assert_allclose(out["rewards"], want, atol=1e-4)
  hidden = np.asarray(out["hidden_states"])
  assert hidden.shape == want_hidden.shape
  err_n = np.abs((hidden - want_hidden) * mask[None, :, :, None]).max(axis=(1, 2, 3))
  assert (err_n < 1e-4).all(), err_n  # every layer, real tokens only


def _score(cfg, params, batch):
  with jax.default_matmul_precision("highest"):
    return scoring.score_batch(cfg, params, batch)[0]


@pytest.mark.parity
@pytest.mark.parametrize(
  "variant", ["gemma2", *(pytest.param(v, marks=pytest.mark.slow) for v in ("gemma3", "qwen3_moe"))]
)
def test_dense_blocked_and_packed_agree(torch, tmp_path, variant):
  model = hf_model(torch, variant, seed=1)
  model.save_pretrained(str(tmp_path))
  cfg, params = hf_io.load_hf(tmp_path)
  ids, mask = tokens([10, 3, 7, 1, 9, 0], 10, left=True, seed=2)
  batch = {
    "input_ids": ids.reshape(3, 2, 10),
    "attention_mask": mask.reshape(3, 2, 10),
    "scores": np.ones((3, 2), np.float32),
    "task_ids": np.zeros((3,), np.int32),
  }
  padded = PaddedBatch.from_dict(jax.tree.map(jnp.asarray, batch))
  want_bn = _score(cfg.replace(attention="dense"), params, padded)
  hf_rewards, _ = hf_run(torch, model, ids, mask)
  real = mask.sum(-1) > 0
  np.testing.assert_allclose(np.asarray(want_bn).ravel()[real], hf_rewards[real], atol=1e-4)
  blocked = cfg.replace(attention="blocked", attention_block=3)
  got_bn = _score(blocked, params, padded)
  np.testing.assert_allclose(got_bn, want_bn, atol=2e-5, rtol=1e-5)
  packed = packing.pack_batch(batch, row_length=16)
  got_bn = _score(blocked, params, jax.tree.map(jnp.asarray, packed))
  np.testing.assert_allclose(
    np.where(real.reshape(3, 2), got_bn, 0), np.where(real.reshape(3, 2), want_bn, 0), atol=2e-5
  )


def _slow_unless(*fast: str) -> list:
  return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in sorted(VARIANTS)]


@pytest.mark.parity
@pytest.mark.parametrize("variant", _slow_unless("qwen2_tied", "gemma2", "qwen3_moe"))
def test_save_hf_round_trip_through_transformers(torch, tmp_path, variant):
  import transformers

  model = hf_model(torch, variant, seed=2)
  model.save_pretrained(str(tmp_path / "orig"))
  cfg, params = hf_io.load_hf(tmp_path / "orig")
  out_dir = hf_io.save_hf(tmp_path / "saved", cfg, params, max_shard_bytes=200_000)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
    str(out_dir), attn_implementation="eager"
  ).eval()
  assert type(reloaded) is type(model)
  ids, mask = _padded_batch()
  want, want_hidden = hf_run(torch, model, ids, mask)
  got, got_hidden = hf_run(torch, reloaded, ids, mask)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got_hidden, want_hidden, atol=1e-5)
  cfg2, params2 = hf_io.load_hf(out_dir)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parity
def test_bfloat16_checkpoint_loads_exactly(torch, tmp_path):
  """Published checkpoints are bfloat16, which safetensors' numpy binding cannot represent."""
  model = hf_model(torch, "qwen2_tied").to(torch.bfloat16)
  model.save_pretrained(str(tmp_path))
  _, params = hf_io.load_hf(tmp_path, param_dtype="bfloat16")
  got = params["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"][1]
  want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T.reshape(got.shape)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)
