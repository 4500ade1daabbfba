"""Deterministic train/eval splits by a stable hash of the prompt."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from jaxpref.data import errors

T = TypeVar("T")


def prompt_fraction(prompt: str, seed: int = 0) -> float:
  """A number in [0, 1) fixed by (seed, prompt): SHA-256, so equal on every machine and run.

  Python's `hash` is salted per process, which would give a different split on every run.
  """
  digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_items(
  items: Sequence[T], eval_fraction: float, *, seed: int = 0
) -> tuple[list[T], list[T]]:
  """Splits items into (train, eval), keeping their order, by a stable hash of `item.prompt`.

  Every item with a given prompt lands on the same side, so no prompt is in both (the
  domain-specific format makes several items per query, HH-RLHF has repeated first turns). The
  eval share is about `eval_fraction` of distinct prompts, not exactly of items.

  Args:
    items: objects with a `prompt` attribute (`PreferenceItem`).
    eval_fraction: in [0, 1].
    seed: another seed gives another split.
  """
  if not 0.0 <= eval_fraction <= 1.0:
    raise errors.DataConfigError(f"eval_fraction={eval_fraction} must be in [0, 1]")
  train, held_out = [], []
  for item in items:
    (held_out if prompt_fraction(item.prompt, seed) < eval_fraction else train).append(item)
  return train, held_out
