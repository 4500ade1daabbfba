"""Deterministic train/eval splits by a stable hash of the prompt."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from jaxpref.data import DataConfigError, PreferenceItem, read_preferences, split_items


def _items(n: int, per_prompt: int = 3) -> list[PreferenceItem]:
  return [
    PreferenceItem(
      texts=(f"p{i} a", f"p{i} b"),
      scores=(1.0, 0.0),
      prompt=f"prompt {i}",
      task="t",
      index=i * per_prompt + k,
    )
    for i in range(n)
    for k in range(per_prompt)
  ]


def test_split_is_disjoint_by_prompt_ordered_and_complete():
  items = _items(400)
  train, held = split_items(items, 0.25, seed=3)
  assert not {it.prompt for it in train} & {it.prompt for it in held}
  assert sorted(train + held, key=lambda it: it.index) == items
  assert [it.index for it in train] == sorted(it.index for it in train)
  assert 0.18 < len({it.prompt for it in held}) / 400 < 0.32


def test_split_matches_an_independent_sha256_rule():
  items = _items(50, per_prompt=1)
  _, held = split_items(items, 0.5, seed=7)
  expected = [
    it
    for it in items
    if int.from_bytes(hashlib.sha256(f"7\x00{it.prompt}".encode()).digest()[:8], "big") < 2**63
  ]
  assert held == expected


def test_split_is_stable_across_processes_and_changes_with_seed():
  code = (
    "from jaxpref.data import PreferenceItem, split_items;"
    "items=[PreferenceItem(('a','b'),(1.,0.),f'p{i}','t') for i in range(64)];"
    "print([it.prompt for it in split_items(items, 0.3)[1]])"
  )
  other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  here = [PreferenceItem(("a", "b"), (1.0, 0.0), f"p{i}", "t") for i in range(64)]
  # Python's salted hash() would differ between processes.
  assert other.stdout.strip() == str([it.prompt for it in split_items(here, 0.3)[1]])
  items = _items(64, per_prompt=1)
  assert split_items(items, 0.3, seed=0)[1] != split_items(items, 0.3, seed=1)[1]
  assert split_items(items, 0.0)[1] == [] and split_items(items, 1.0)[0] == []
  with pytest.raises(DataConfigError):
    split_items(items, 1.5)


def test_real_dsp_split_keeps_each_query_on_one_side(preferences_dir):
  items, _ = read_preferences(preferences_dir / "domain_specific.json", on_error="skip")
  train, held = split_items(items, 0.1)
  assert held and not {it.prompt for it in train} & {it.prompt for it in held}
