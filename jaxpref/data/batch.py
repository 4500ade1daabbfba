"""The train batch types: what the data pipeline makes and the train step consumes.

A batch is padded (`PaddedBatch`: every response of every item padded to one bucket length) or
packed (`PackedBatch`: the responses laid end to end in rows, see `jaxpref.data.packing`). Both
are pytrees of arrays (numpy on the host, jax on device); the type, not the keys, tells the scorer
which forward pass to run.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import numpy as np


@flax.struct.dataclass
class PaddedBatch:
  """Items of N responses, each padded to L tokens (b: this process's items, or all of them).

  Attributes:
    input_ids: int32 [b, N, L].
    attention_mask: int32 [b, N, L], 1 on real tokens.
    scores: float32 [b, N]; higher is preferred, < 0 marks a padding response.
    task_ids: int32 [b].
  """

  input_ids: Any
  attention_mask: Any
  scores: Any
  task_ids: Any

  def tokens(self) -> tuple[Any, int]:
    """(real tokens, positions computed)."""
    return self.attention_mask.sum(), self.attention_mask.size

  @classmethod
  def from_dict(cls, batch: dict[str, Any]) -> PaddedBatch:
    return cls(
      input_ids=batch["input_ids"],
      attention_mask=batch["attention_mask"],
      scores=batch["scores"],
      task_ids=batch["task_ids"],
    )


@flax.struct.dataclass
class PackedBatch:
  """The b * N responses of a batch packed into R rows of L tokens (`jaxpref.data.packing`).

  Attributes:
    input_ids: int32 [R, L], 0 on unused slots.
    segment_ids: int32 [R, L], 1, 2, ... for the segments of a row (a response, or with shared
      prompts an item: its prompt and its responses); 0 on unused slots.
    branch_ids: int32 [R, L], 0 on a segment's shared prompt (seen by all its responses), k >= 1
      on the own tokens of its k-th response (seen by that response only); 1 on every token of
      an unshared response, 0 on unused slots.
    positions: int32 [R, L], 0 at each segment's first token (a response after a shared prompt
      continues from the prompt's positions).
    last_index: int32 [b * N], flat index (row * L + column) of each response's last token in
      the global [R_global, L] array; -1 for an empty (padding) response.
    lengths: int32 [b, N], tokens of every response (for FLOP counts and summaries).
    scores: float32 [b, N].
    task_ids: int32 [b].
  """

  input_ids: Any
  segment_ids: Any
  branch_ids: Any
  positions: Any
  last_index: Any
  lengths: Any
  scores: Any
  task_ids: Any

  def tokens(self) -> tuple[Any, int]:
    """(real tokens, positions computed)."""
    return (self.segment_ids > 0).sum(), self.segment_ids.size


TrainBatch = PaddedBatch | PackedBatch


def response_lengths(batch: TrainBatch) -> np.ndarray:
  """Host: tokens of every response of a padded or packed batch, int [b, N]."""
  if isinstance(batch, PackedBatch):
    return np.asarray(batch.lengths)
  return np.asarray(batch.attention_mask).sum(-1)
