"""Shared-prompt packing: an item's common prefix computed once gives the rewards and gradients
of scoring each response whole, for every decoder family, N = 2 and N > 2, packed across items;
and training, evaluation and `Scorer` (best-of-n) use it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import NATIVE_DECODERS, VARIANTS, hf_model

from jaxpref.data import packing
from jaxpref.data.batch import PaddedBatch
from jaxpref.evaluation import evaluator, scoring
from jaxpref.models import hf_io, reward_model

NATIVE = NATIVE_DECODERS
# (prompt length, own tokens of each response): N = 2 and N = 3, a response of one own token,
# an item with no common prefix, and a padding (empty) third response.
ITEMS = [(6, [4, 7, 2]), (9, [1, 5, 0]), (0, [8, 3, 0]), (3, [6, 6, 6]), (5, [2, 9, 0])]


def _batch(length: int = 16, left: bool = False, seed: int = 0) -> PaddedBatch:
  rng = np.random.default_rng(seed)
  n = max(len(own) for _, own in ITEMS)
  ids = np.zeros((len(ITEMS), n, length), np.int32)
  mask = np.zeros_like(ids)
  scores = np.full((len(ITEMS), n), -1.0, np.float32)
  for b, (prompt_len, own) in enumerate(ITEMS):
    prompt = rng.integers(1, 97, prompt_len)
    for k, m in enumerate(own):
      if not m:
        continue
      seq = np.concatenate([prompt, rng.integers(1, 97, m)])
      if prompt_len == 0:  # no common prefix: different first tokens
        seq[0] = 1 + k
      span = slice(length - len(seq), length) if left else slice(0, len(seq))
      ids[b, k, span], mask[b, k, span] = seq, 1
      scores[b, k] = float(k)
  return PaddedBatch(ids, mask, scores, np.zeros(len(ITEMS), np.int32))


@functools.partial(jax.jit, static_argnums=0)
def _rewards_and_grads(cfg, params, batch):
  def loss(p):
    rewards_bn, _ = scoring.score_batch(cfg, p, batch)
    weights_bn = jnp.arange(rewards_bn.size).reshape(rewards_bn.shape)
    weights_bn = jnp.where(jnp.asarray(batch.scores) >= 0, weights_bn, 0)
    return (rewards_bn * weights_bn).sum(), rewards_bn

  with jax.default_matmul_precision("highest"):
    (_, rewards_bn), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return rewards_bn, grads


def _check_exact(cfg, params, left=False, row_length=24):
  padded = _batch(left=left)
  real = padded.scores >= 0
  want_bn, want_grads = _rewards_and_grads(cfg, params, jax.tree.map(jnp.asarray, padded))
  shared = packing.pack_batch(padded, row_length=row_length, share_prompts=True)
  unshared = packing.pack_batch(padded, row_length=row_length)
  # Fewer positions, several items in a row, and a response after a prompt sees both.
  assert (shared.segment_ids > 0).sum() < (unshared.segment_ids > 0).sum()
  assert shared.input_ids.shape[0] < len(ITEMS)
  got_bn, got_grads = _rewards_and_grads(cfg, params, jax.tree.map(jnp.asarray, shared))
  want_bn, got_bn = np.asarray(want_bn), np.asarray(got_bn)
  np.testing.assert_allclose(got_bn[real], want_bn[real], atol=2e-5, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    # float32 rounding of sums over different orders: relative to each array's scale.
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()) + 1e-7)


@pytest.mark.parametrize(("name", "left"), [("gpt_neox", False), ("llama", True)])
def test_shared_prompts_exact_native(name, left):
  cfg = NATIVE[name]
  params = reward_model.init_params(cfg, jax.random.key(1))
  _check_exact(cfg, params, left=left)


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  torch.set_num_threads(1)
  return torch


@pytest.mark.parametrize(
  "variant",
  [
    v if v in ("gemma2", "qwen3_moe") else pytest.param(v, marks=pytest.mark.slow)
    for v in sorted(VARIANTS)
  ],
)
def test_shared_prompts_exact_families(torch, tmp_path, variant):
  """Sliding windows (positions continue after the prompt), soft-capping, MoE routing."""
  model = hf_model(torch, variant, seed=3)
  model.save_pretrained(str(tmp_path))
  cfg, params = hf_io.load_hf(tmp_path)
  _check_exact(cfg.replace(attention_block=8), params, row_length=24)


def test_pack_groups_layout():
  prompt = np.array([5, 6, 7])
  groups = [
    [np.r_[prompt, 1, 2], np.r_[prompt, 3], np.r_[prompt, 4, 4, 4]],
    [np.array([9, 9]), np.array([9, 9])],  # identical: packed once, read at one position
    [np.array([8])],
  ]
  rows = packing.pack_groups(groups, row_length=16, share_prompts=True)
  flat = [s for g in groups for s in g]
  for s, last in zip(flat, rows.last_index):
    r, c = divmod(int(last), 16)
    assert rows.input_ids[r, c] == s[-1]
    assert rows.positions[r, c] == len(s) - 1
  first = rows.segment_ids[rows.input_ids == 5]
  assert len(first) == 1  # the prompt once
  (r,), (c,) = np.nonzero(rows.input_ids == 7)
  assert rows.branch_ids[r, c] == 0 and rows.positions[r, c] == 2
  # 3 + 2 + 1 + 3 own tokens; the identical pair once; 1.
  assert (rows.segment_ids > 0).sum() == 3 + 6 + 2 + 1
  assert rows.last_index[3] == rows.last_index[4]
  unshared = packing.pack_groups(groups, row_length=16)  # identical ones once here too
  assert unshared.last_index[3] == unshared.last_index[4] >= 0
  assert packing.rows_needed(groups, 16, share_prompts=True) == rows.input_ids.shape[0]
  assert packing.shared_prefix_length([np.array([1, 2]), np.array([1])]) == 0
  assert packing.shared_prefix_length([np.array([1, 2, 3])]) == 0


def test_scorer_best_of_n_and_eval_use_shared_prompts(monkeypatch):
  cfg = NATIVE["llama"]
  params = reward_model.init_params(cfg, jax.random.key(2))
  rng = np.random.default_rng(0)
  # Each group fits a row of 32 (the power of two that holds its longest sequence).
  prompts = [rng.integers(1, 97, n) for n in (12, 5, 9)]
  groups = [[np.r_[p, rng.integers(1, 97, m)] for m in (3, 2, 1, 4, 2)] for p in prompts]
  flat = [s for g in groups for s in g]
  padded = scoring.Scorer(cfg, params, batch_size=4, max_length=64, packing=False)
  want = padded.score_token_ids(flat)
  seen = []
  real_pack = packing.pack_groups
  monkeypatch.setattr(
    packing, "pack_groups", lambda *a, **k: seen.append(real_pack(*a, **k)) or seen[-1]
  )
  shared = scoring.Scorer(cfg, params, batch_size=4, max_length=64)
  got = shared.score_token_ids(flat, group_sizes=[5, 5, 5])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  positions = sum(int((rows.segment_ids > 0).sum()) for rows in seen)
  assert positions == sum(len(s) for s in flat) - sum(4 * len(p) for p in prompts)

  batch = _batch()
  batch_dict = {
    "input_ids": batch.input_ids,
    "attention_mask": batch.attention_mask,
    "scores": batch.scores,
    "task_ids": batch.task_ids,
    "valid_b": np.ones(len(ITEMS), bool),
  }
  want_bn, _ = evaluator.collect_rewards(cfg, params, [batch_dict], packing=False)
  got_bn, scores_bn = evaluator.collect_rewards(cfg, params, [batch_dict])
  real = scores_bn >= 0
  np.testing.assert_allclose(got_bn[real], want_bn[real], atol=2e-5, rtol=1e-5)
