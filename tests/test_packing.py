"""Sequence packing: the packer keeps every token, and packed rewards and gradients equal padded."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hf_models import NATIVE_DECODERS

from jaxpref.data import packing
from jaxpref.data.batch import PaddedBatch
from jaxpref.evaluation import scoring
from jaxpref.models import reward_model
from jaxpref.objectives import objective as objectives
from jaxpref.training import step as train_step_lib

CONFIGS = NATIVE_DECODERS
LENGTHS_BN = [[12, 5], [3, 16], [9, 0], [1, 7]]  # [2, 0]: a padded (empty) second response.


def _batch(left: bool = False, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths_bn = np.asarray(LENGTHS_BN)
  mask_bnl = (np.arange(length) < lengths_bn[..., None]).astype(np.int32)
  if left:
    mask_bnl = mask_bnl[..., ::-1].copy()
  ids_bnl = np.where(mask_bnl > 0, rng.integers(1, 97, mask_bnl.shape), 0).astype(np.int32)
  scores_bn = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [1.0, 0.0]], np.float32)
  return {
    "input_ids": ids_bnl,
    "attention_mask": mask_bnl,
    "scores": scores_bn,
    "task_ids": np.array([0, 1, 0, 1], np.int32),
  }


@pytest.mark.parametrize("left", [False, True])
def test_pack_batch_keeps_every_sequence(left):
  batch = _batch(left=left)
  packed = packing.pack_batch(batch, row_length=20, row_multiple=2)
  ids_rl, seg_rl = packed.input_ids, packed.segment_ids
  pos_rl, last_s = packed.positions, packed.last_index
  total = sum(sum(row) for row in LENGTHS_BN)
  assert ids_rl.shape[0] % 2 == 0 and ids_rl.shape[1] == 20
  assert ids_rl.shape[0] * 20 >= total and (seg_rl > 0).sum() == total
  flat_ids, flat_seg, flat_pos = ids_rl.ravel(), seg_rl.ravel(), pos_rl.ravel()
  for s, (ids_l, mask_l) in enumerate(
    zip(batch["input_ids"].reshape(8, -1), batch["attention_mask"].reshape(8, -1))
  ):
    want = ids_l[mask_l > 0]
    if len(want) == 0:
      assert last_s[s] == -1
      continue
    end = last_s[s] + 1
    got = flat_ids[end - len(want) : end]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(flat_pos[end - len(want) : end], np.arange(len(want)))
    assert len(set(flat_seg[end - len(want) : end])) == 1 and flat_seg[end - 1] > 0
    # Nothing of the same segment just before the first token in the same row.
    start = end - len(want)
    if start % 20:
      assert flat_seg[start - 1] != flat_seg[start]


def test_first_fit_decreasing_fills_rows_and_rejects_overlong():
  row_s, start_s = packing.first_fit_decreasing(np.array([6, 4, 5, 0, 5]), 10)
  assert row_s.tolist() == [0, 0, 1, -1, 1] and start_s.tolist() == [0, 6, 0, -1, 5]
  with pytest.raises(ValueError, match="11 tokens"):
    packing.first_fit_decreasing(np.array([11]), 10)
  with pytest.raises(ValueError, match="num_rows=1"):
    packing.pack_batch(_batch(), row_length=16, num_rows=1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  cfg = CONFIGS[request.param]
  return cfg, jax.jit(functools.partial(reward_model.init_params, cfg))(jax.random.key(0))


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_packed_rewards_equal_padded(model, attention):
  cfg, params = model
  cfg = cfg.replace(attention=attention, attention_block=8)
  batch = _batch(left=True)
  padded = PaddedBatch.from_dict(jax.tree.map(jnp.asarray, batch))
  want_bn, want_pooled = scoring.score_batch(cfg, params, padded)
  packed = packing.pack_batch(batch, row_length=24)
  assert packed.input_ids.size < batch["input_ids"].size
  np.testing.assert_array_equal(packed.lengths, batch["attention_mask"].sum(-1))
  got_bn, got_pooled = jax.jit(functools.partial(scoring.score_batch, cfg))(params, packed)
  real_bn = np.asarray(batch["attention_mask"]).sum(-1) > 0
  np.testing.assert_allclose(
    np.where(real_bn, got_bn, 0), np.where(real_bn, want_bn, 0), atol=2e-5, rtol=1e-5
  )
  np.testing.assert_allclose(got_pooled[real_bn], want_pooled[real_bn], atol=2e-5, rtol=1e-5)


def test_packed_train_step_equals_padded(model):
  cfg, params = model
  # SGD: AdamW would turn the final norm bias's gradient, exactly 0 padded (chosen and rejected
  # cancel) and ~1e-9 packed (rounding), into full-size steps of opposite sign.
  optimizer = optax.sgd(1.0)
  program = train_step_lib.build_train_step(
    cfg,
    loss_cfg=objectives.LossConfig(kind="more"),
    optimizer=optimizer,
    schedule=optax.constant_schedule(1e-3),
    num_tasks=2,
  )
  batch = _batch()
  results = []
  for b in (PaddedBatch.from_dict(batch), packing.pack_batch(batch, row_length=32)):
    state = program.init(jax.random.key(0), params)
    state, metrics = program.step_fn(state, jax.tree.map(jnp.asarray, b))
    results.append((state, metrics))
  (padded_state, padded), (packed_state, packed) = results
  for key in ("loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(packed[key], padded[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(packed["task_weight_t"], padded["task_weight_t"], atol=1e-5)
  for a, b in zip(jax.tree.leaves(packed_state.params), jax.tree.leaves(padded_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_packing_needs_a_decoder_with_last_pooling(model):
  cfg, params = model
  packed = packing.pack_batch(_batch(), row_length=32)
  with pytest.raises(ValueError, match="model.pooling='mean'"):
    scoring.score_batch(cfg.replace(pooling="mean"), params, packed)
