"""Tokenisation, truncation (counted), padding sides, special tokens and length buckets."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpref.data import (
  DataConfigError,
  DataSummary,
  PreferenceItem,
  TokenizeOptions,
  bucket_length,
  collate,
  length_buckets,
  load_tokenizer,
  read_preferences,
  tokenize_items,
)
from jaxpref.testing import EOS, word_tokenizer

WORDS = [f"w{i}" for i in range(40)]


def _item(*texts: str, scores=None) -> PreferenceItem:
  scores = scores or tuple(float(len(texts) - i) for i in range(len(texts)))
  return PreferenceItem(texts=texts, scores=tuple(scores), prompt="p", task="t")


def _text(start: int, n: int) -> str:
  return " ".join(WORDS[start : start + n])


def _row(tok, r: int) -> list[int]:
  start, size = tok.starts_r[r], tok.lengths_r[r]
  return tok.token_ids[start : start + size].tolist()


def test_length_buckets():
  assert length_buckets(512) == (32, 64, 128, 256, 512)
  assert length_buckets(300, min_bucket=64) == (64, 128, 256, 300)
  assert length_buckets(16) == (16,)
  assert length_buckets(256, min_bucket=32, multiple=64) == (32, 64, 128, 192, 256)
  assert length_buckets(300, min_bucket=40, multiple=64) == (40, 64, 128, 192, 256, 300)
  with pytest.raises(ValueError, match="multiple=-1"):
    length_buckets(64, multiple=-1)
  assert [bucket_length(n, (32, 64, 100)) for n in (1, 32, 33, 100)] == [32, 32, 64, 100]
  with pytest.raises(ValueError):
    bucket_length(101, (32, 64, 100))


def test_truncation_sides_keep_eos_and_are_counted():
  tokenizer = word_tokenizer(words=WORDS)
  eos = tokenizer.eos_token_id
  items = [
    _item(_text(0, 3), _text(3, 12)),
    _item(_text(0, 2), _text(5, 4)),
    _item(_text(0, 20), "", scores=(1.0, -1.0)),
  ]
  ids = lambda text: [WORDS.index(w) + 2 for w in text.split()]  # noqa: E731
  summary = DataSummary()
  left = tokenize_items(items, tokenizer, TokenizeOptions(max_length=8), summary=summary)
  # Item 0 (12 + EOS > 8) and item 2 (20 + EOS) are cut; item 1 is not.
  assert left.num_truncated == 2 and summary.truncated == 2
  assert _row(left, 0) == ids(_text(0, 3)) + [eos]
  assert _row(left, 1) == ids(_text(3, 12))[-7:] + [eos]  # The end is kept, EOS stays last.
  assert left.lengths_r.tolist() == [4, 8, 3, 5, 8, 0]  # The pad response has no tokens.
  assert left.item_lengths.tolist() == [8, 5, 8]
  right = tokenize_items(items, tokenizer, TokenizeOptions(max_length=8, truncation_side="right"))
  assert _row(right, 1) == ids(_text(3, 12))[:7] + [eos]
  assert right.scores_r.tolist() == [2.0, 1.0, 2.0, 1.0, 1.0, -1.0]


def test_special_token_modes():
  tokenizer = word_tokenizer(words=WORDS)
  tokenizer.bos_token = "w39"  # Pretend the tokenizer has a distinct BOS.
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  item = [_item("w1 w2", f"w3 {EOS}")]
  rows = {
    mode: tokenize_items(item, tokenizer, TokenizeOptions(max_length=16, special_tokens=mode))
    for mode in ("auto", "paper", "tokenizer", "none")
  }
  assert _row(rows["auto"], 0) == [3, 4, eos]
  # A text's own EOS stays a text token, as in a plain Hugging Face tokenizer call.
  assert _row(rows["auto"], 1) == [5, eos, eos]
  assert _row(rows["paper"], 0) == [bos, 3, 4, eos]
  assert _row(rows["tokenizer"], 0) == [3, 4] and _row(rows["none"], 0) == [3, 4]
  cut = tokenize_items(
    [_item(_text(0, 9), "w1")], tokenizer, TokenizeOptions(max_length=5, special_tokens="paper")
  )
  assert _row(cut, 0) == [bos, 8, 9, 10, eos]  # Truncation removes text, not BOS/EOS.
  own = tokenize_items(
    [_item(f"w39 {_text(0, 9)} {EOS}", "w1")],
    tokenizer,
    TokenizeOptions(max_length=5, special_tokens="paper", truncation_side="right"),
  )
  assert _row(own, 0) == [bos, bos, 2, 3, eos]  # A text's own BOS is text: cut like text.
  with pytest.raises(DataConfigError, match="no room"):
    tokenize_items(item, tokenizer, TokenizeOptions(max_length=2, special_tokens="paper"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_to_length_with_masks_and_dummy_rows(side):
  tokenizer = word_tokenizer(words=WORDS)
  items = [_item(_text(0, 3), _text(3, 5)), _item("w1 w2", "w3", "w4 w5 w6")]
  tok = tokenize_items(items, tokenizer, TokenizeOptions(max_length=16))
  batch = collate([(tok, 1, 2), None, (tok, 0, 0)], num_responses=3, length=8, padding_side=side)
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 3, 8)
  assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
  np.testing.assert_array_equal(batch["scores"], [[3, 2, 1], [-1, -1, -1], [2, 1, -1]])
  np.testing.assert_array_equal(batch["task_ids"], [2, 0, 0])
  np.testing.assert_array_equal(batch["attention_mask"].sum(-1), [[3, 2, 4], [0, 0, 0], [4, 6, 0]])
  row = batch["input_ids"][2, 1]
  real = row[batch["attention_mask"][2, 1] == 1].tolist()
  assert real == [5, 6, 7, 8, 9, tokenizer.eos_token_id]
  mask = batch["attention_mask"][2, 1]
  assert (
    (mask[:6].all() and not mask[6:].any())
    if side == "right"
    else (mask[2:].all() and not mask[:2].any())
  )
  assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
  with pytest.raises(DataConfigError, match="responses_per_item is 2"):
    collate([(tok, 1, 0)], num_responses=2, length=8)


def test_gpt2_tokenizer_file_matches_tokenizers_library(gpt2_tokenizer_file):
  import tokenizers

  tokenizer = load_tokenizer(gpt2_tokenizer_file)
  assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
  assert tokenizer.pad_token_id == 50256
  reference = tokenizers.Tokenizer.from_file(str(gpt2_tokenizer_file))
  text = "\n\nHuman: Hello there, friend!\n\nAssistant: Hi."
  tok = tokenize_items([_item(text, "x")], tokenizer, TokenizeOptions(max_length=64))
  assert _row(tok, 0) == reference.encode(text, add_special_tokens=False).ids + [50256]


def test_real_truncation_count_matches_an_independent_count(preferences_dir, gpt2_tokenizer_file):
  import tokenizers

  items, summary = read_preferences(preferences_dir / "helpful.json")
  items = items[:300]
  reference = tokenizers.Tokenizer.from_file(str(gpt2_tokenizer_file))
  max_length = 128
  expected = sum(
    any(len(reference.encode(t, add_special_tokens=False).ids) + 1 > max_length for t in item.texts)
    for item in items
  )
  tok = tokenize_items(
    items,
    load_tokenizer(gpt2_tokenizer_file),
    TokenizeOptions(max_length=max_length),
    summary=summary,
  )
  assert 0 < expected < len(items)
  assert tok.num_truncated == summary.truncated == expected
  assert tok.lengths_r.max() == max_length
  assert (tok.token_ids[tok.starts_r + tok.lengths_r - 1] == 50256).all()  # EOS kept last.


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_tokenizer(tmp_path / "nope.json")
  with pytest.raises(DataConfigError, match="cannot load a tokenizer"):
    load_tokenizer(tmp_path)
  with pytest.raises(DataConfigError, match="truncation_side"):
    TokenizeOptions(truncation_side="middle")
  with pytest.raises(DataConfigError, match="buckets"):
    TokenizeOptions(max_length=64, buckets=(32, 48))
