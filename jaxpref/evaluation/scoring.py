"""The one scoring function that training, evaluation, calibration and `jaxpref.score` share.

`score_fn(cfg, params, input_ids_bnl, attention_mask_bnl) -> (rewards_bn, pooled_bnd)` scores a
stacked response axis in one forward pass; `packed_score_fn` scores packed rows
(`jaxpref.data.packing`, shared prompts included) with the same model. The train step
differentiates them (`score_batch`); evaluation and `Scorer` jit them once per shape, so nothing
re-implements the forward pass. Evaluation and scoring pack by default where the model can
(`reward_model.packable`: a causal decoder with last-token pooling), with each group's (item's,
or best-of-n record's) common prompt computed once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.data import packing
from jaxpref.data.batch import PaddedBatch, TrainBatch
from jaxpref.models import reward_model
from jaxpref.models.config import ModelConfig


def score_fn(
  cfg: ModelConfig,
  params,
  input_ids_bnl: jax.Array,
  attention_mask_bnl: jax.Array,
  *,
  dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Rewards of every response of every item.

  Args:
    cfg: model config (static).
    params: reward-model parameters.
    input_ids_bnl: token ids, [B, N, L] (or [B, L], treated as N = 1 and squeezed back).
    attention_mask_bnl: 1 on real tokens, same shape.
    dropout_rng: turns on the model's dropout (training with `lora.dropout` only).

  Returns:
    rewards_bn (float32) and the pooled embeddings pooled_bnd that the linear head saw.
  """
  squeeze = input_ids_bnl.ndim == 2
  if squeeze:
    input_ids_bnl, attention_mask_bnl = input_ids_bnl[:, None], attention_mask_bnl[:, None]
  b, n, length = input_ids_bnl.shape
  outputs = reward_model.apply(
    cfg,
    params,
    input_ids_bnl.reshape(b * n, length),
    attention_mask_bnl.reshape(b * n, length),
    dropout_rng=dropout_rng,
  )
  rewards_bn = outputs["rewards"].reshape(b, n)
  pooled_bnd = outputs["pooled"].reshape(b, n, -1)
  if squeeze:
    return rewards_bn[:, 0], pooled_bnd[:, 0]
  return rewards_bn, pooled_bnd


def score_batch(
  cfg: ModelConfig, params, batch: TrainBatch, *, dropout_rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """`score_fn` on a training batch, padded or packed (`jaxpref.data.batch`).

  `dropout_rng` (training only) turns on the model's dropout (LoRA's `lora.dropout`).
  """
  if isinstance(batch, PaddedBatch):
    return score_fn(cfg, params, batch.input_ids, batch.attention_mask, dropout_rng=dropout_rng)
  b, n = batch.scores.shape
  outputs = reward_model.apply(
    cfg,
    params,
    batch.input_ids,
    (batch.segment_ids > 0).astype(jnp.int32),
    packed={
      "segment_ids": batch.segment_ids,
      "branch_ids": batch.branch_ids,
      "positions": batch.positions,
      "last_index": batch.last_index,
    },
    dropout_rng=dropout_rng,
  )
  return outputs["rewards"].reshape(b, n), outputs["pooled"].reshape(b, n, -1)


def packed_score_fn(
  cfg: ModelConfig, params, rows: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Rewards [S] and pooled embeddings [S, D] of the sequences packed in `rows`.

  Args:
    rows: `input_ids`, `segment_ids`, `branch_ids`, `positions` [R, L] and `last_index` [S]
      (`jaxpref.data.packing.PackedRows`; -1 for padding sequences, whose rewards mean nothing).
  """
  outputs = reward_model.apply(
    cfg,
    params,
    rows["input_ids"],
    (rows["segment_ids"] > 0).astype(jnp.int32),
    packed={k: rows[k] for k in ("segment_ids", "branch_ids", "positions", "last_index")},
  )
  return outputs["rewards"], outputs["pooled"]


@functools.lru_cache(maxsize=32)
def compiled_packed_score_fn(cfg: ModelConfig):
  """`packed_score_fn` jitted for one config (one executable per packed shape)."""
  return jax.jit(functools.partial(packed_score_fn, cfg))


def score_packed(
  cfg: ModelConfig,
  params,
  sequences_gs: Sequence[Sequence[np.ndarray]],
  *,
  row_length: int,
  share_prompts: bool = True,
  row_multiple: int = 1,
  num_sequences: int | None = None,
) -> list[np.ndarray]:
  """Rewards of groups of token sequences, packed (see `jaxpref.data.packing.pack_groups`).

  Args:
    sequences_gs: groups of 1-D token arrays (an empty one is padding; its reward is 0).
    row_length: tokens per packed row; every sequence must fit.
    share_prompts: compute each group's common prefix once.
    row_multiple: round the row count up to a multiple of this (fewer compiled shapes).
    num_sequences: pad the sequence axis to this many (default: a power of two).

  Returns:
    One float32 array of rewards per group.
  """
  rows = packing.pack_groups(
    sequences_gs, row_length=row_length, share_prompts=share_prompts, row_multiple=row_multiple
  )
  total = len(rows.last_index)
  width = num_sequences or 1 << max(total - 1, 0).bit_length()
  last_index = np.full(max(width, total), -1, np.int32)
  last_index[:total] = rows.last_index
  rewards_s, _ = compiled_packed_score_fn(cfg)(params, {**rows._asdict(), "last_index": last_index})
  rewards_s = np.where(last_index[:total] >= 0, np.asarray(rewards_s)[:total], 0.0)
  bounds = np.cumsum([len(g) for g in sequences_gs])[:-1]
  return np.split(rewards_s.astype(np.float32), bounds)


class RewardError(ValueError):
  """Rewards that cannot be right (non-finite) or inputs the model cannot read (token ids beyond
  its vocabulary); the one-line message names the likely cause."""


def check_token_ids(max_id: int, vocab_size: int, where: str = "") -> None:
  """Refuses token ids the embedding table does not have (JAX would silently read NaN/garbage).

  Raises:
    RewardError: naming the largest id and the model's vocabulary size.
  """
  if max_id >= vocab_size:
    prefix = f"{where}: " if where else ""
    raise RewardError(
      f"{prefix}token id {max_id} >= the model's vocab_size {vocab_size}: the tokenizer does not "
      "belong to this model (a larger vocabulary); use the model's own tokenizer"
    )


def non_finite_leaves(params) -> list[str]:
  """Paths of the floating-point leaves of `params` that hold a NaN or inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    # Reduced where the leaf lives: also for arrays sharded over several processes.
    if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
      bad.append(jax.tree_util.keystr(path))
  return bad


def check_finite_rewards(rewards: np.ndarray, params, where: str = "") -> None:
  """Refuses NaN/inf rewards, naming the likely cause (non-finite weights or overflow).

  Raises:
    RewardError: when any reward is not finite.
  """
  rewards = np.asarray(rewards)
  bad = int(np.size(rewards) - np.isfinite(rewards).sum())
  if not bad:
    return
  prefix = f"{where}: " if where else ""
  bad_params = non_finite_leaves(params)
  if bad_params:
    cause = (
      f"the model's weights are not finite ({len(bad_params)} arrays with NaN/inf, first "
      f"{bad_params[0]}): the checkpoint is broken"
    )
  else:
    cause = "the weights are finite, so the forward pass overflowed: try --dtype=float32"
  raise RewardError(f"{prefix}{bad} of {np.size(rewards)} rewards are NaN/inf; {cause}")


@functools.lru_cache(maxsize=32)
def compiled_score_fn(cfg: ModelConfig):
  """`score_fn` jitted for one config; jax caches one executable per input shape and sharding."""
  return jax.jit(functools.partial(score_fn, cfg))


def pad_rows(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens (the largest bucket if none does)."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  return buckets[-1]


def default_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` up to `max_length`, plus `max_length` itself."""
  buckets, size = [], smallest
  while size < max_length:
    buckets.append(size)
    size *= 2
  buckets.append(max_length)
  return tuple(buckets)


class Scorer:
  """Scores tokenised sequences with the shared compiled scoring functions.

  Packed (default, where `reward_model.packable`): groups of sequences (e.g. a best-of-n prompt's
  responses; by default each sequence alone) are sorted by length and packed, about `batch_size`
  rows a call, each group's common prompt computed once with `share_prompts` and its identical
  sequences once. Padded (`packing=False`,
  or an encoder): sequences sorted by length, each batch padded to `batch_size` rows and to a
  length bucket, so the number of compilations is at most the number of buckets.
  """

  def __init__(
    self,
    cfg: ModelConfig,
    params,
    *,
    batch_size: int = 16,
    max_length: int = 512,
    buckets: Sequence[int] | None = None,
    pad_token_id: int = 0,
    padding_side: str = "right",
    packing: bool = True,
    share_prompts: bool = True,
  ):
    self.cfg, self.params = cfg, params
    self.batch_size = batch_size
    self.buckets = tuple(buckets) if buckets else default_buckets(max_length)
    self.pad_token_id = pad_token_id
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
    self.padding_side = padding_side
    self.packing = packing and reward_model.packable(cfg)
    self.share_prompts = share_prompts
    self._fn = compiled_score_fn(cfg)

  def _pad_batch(self, sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = pad_rows(max(len(s) for s in sequences), self.buckets)
    ids_bl = np.full((self.batch_size, length), self.pad_token_id, np.int32)
    mask_bl = np.zeros((self.batch_size, length), np.int32)
    for row, seq in enumerate(sequences):
      seq = list(seq)[-length:] if self.padding_side == "left" else list(seq)[:length]
      span = slice(length - len(seq), length) if self.padding_side == "left" else slice(0, len(seq))
      ids_bl[row, span] = seq
      mask_bl[row, span] = 1
    return ids_bl, mask_bl

  def score_token_ids(
    self,
    sequences: Sequence[Sequence[int]],
    *,
    group_sizes: Sequence[int] | None = None,
    progress: bool = False,
  ) -> np.ndarray:
    """Rewards (float32, input order) for a list of token-id sequences.

    `group_sizes`: consecutive sequences that belong together (sum = len(sequences)); with
    packing and shared prompts, their common prefix is computed once. Default: each alone.
    """
    if not sequences:
      return np.zeros((0,), np.float32)
    if any(len(s) == 0 for s in sequences):
      raise RewardError("cannot score an empty token sequence (an empty text?)")
    check_token_ids(max(max(s) for s in sequences), self.cfg.vocab_size)
    if self.packing:
      rewards = self._score_packed(sequences, group_sizes, progress)
    else:
      rewards = self._score_padded(sequences, progress)
    check_finite_rewards(rewards, self.params)
    return rewards

  def _score_padded(self, sequences: Sequence[Sequence[int]], progress: bool) -> np.ndarray:
    order = np.argsort([len(s) for s in sequences], kind="stable")
    rewards = np.zeros((len(sequences),), np.float32)
    batches: Iterable = range(0, len(order), self.batch_size)
    if progress:
      from tqdm.auto import tqdm

      batches = tqdm(batches, desc="scoring", unit="batch", total=-(-len(order) // self.batch_size))
    for start in batches:
      index = order[start : start + self.batch_size]
      ids_bl, mask_bl = self._pad_batch([sequences[i] for i in index])
      rewards_b, _ = self._fn(self.params, jnp.asarray(ids_bl), jnp.asarray(mask_bl))
      rewards[index] = np.asarray(rewards_b)[: len(index)]
    return rewards

  def _score_packed(
    self,
    sequences: Sequence[Sequence[int]],
    group_sizes: Sequence[int] | None,
    progress: bool,
  ) -> np.ndarray:
    sizes = list(group_sizes) if group_sizes is not None else [1] * len(sequences)
    if sum(sizes) != len(sequences) or min(sizes, default=1) < 1:
      raise ValueError(f"group_sizes sum to {sum(sizes)} for {len(sequences)} sequences")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    groups = [
      [np.asarray(sequences[i], np.int32) for i in range(a, a + n)] for a, n in zip(starts, sizes)
    ]
    # Rows as long as the power of two that holds a chunk's longest sequence (longest first;
    # a group longer than a row is split into segments that each repeat its prompt), and about
    # `batch_size` rows of tokens a call.
    tokens_g, longest_g = np.zeros(len(groups), int), np.zeros(len(groups), int)
    for g, group in enumerate(groups):
      longest_g[g] = max(len(x) for x in group)
      row_length = max(32, 1 << (int(longest_g[g]) - 1).bit_length())
      prefix = packing.shared_prefix_length(group) if self.share_prompts else 0
      units = packing.plan_units([[len(x) for x in group]], [prefix], row_length)
      tokens_g[g] = sum(u.length for u in units)
    chunks: list = []
    budget = 0
    for g in np.argsort(-longest_g, kind="stable"):
      if not chunks or budget < tokens_g[g]:
        row_length = max(32, 1 << (int(longest_g[g]) - 1).bit_length())
        chunks.append((row_length, []))
        budget = self.batch_size * row_length
      chunks[-1][1].append(g)
      budget -= int(tokens_g[g])
    rewards = np.zeros((len(sequences),), np.float32)
    if progress:
      from tqdm.auto import tqdm

      chunks = tqdm(chunks, desc="scoring", unit="batch")
    for row_length, chunk in chunks:
      rewards_g = score_packed(
        self.cfg,
        self.params,
        [groups[g] for g in chunk],
        row_length=row_length,
        share_prompts=self.share_prompts,
        row_multiple=max(1, self.batch_size // 4),
      )
      for g, values in zip(chunk, rewards_g):
        rewards[starts[g] : starts[g] + sizes[g]] = values
    return rewards

  def score_batch(self, input_ids_bnl: np.ndarray, attention_mask_bnl: np.ndarray) -> np.ndarray:
    """Rewards [B, N] of an already padded preference batch."""
    check_token_ids(int(np.max(input_ids_bnl, initial=0)), self.cfg.vocab_size)
    rewards_bn, _ = self._fn(
      self.params, jnp.asarray(input_ids_bnl), jnp.asarray(attention_mask_bnl)
    )
    rewards_bn = np.asarray(rewards_bn)
    check_finite_rewards(rewards_bn[np.asarray(attention_mask_bnl).any(-1)], self.params)
    return rewards_bn
