"""Tokenisation of preference items into one flat token buffer, and length buckets.

Items are tokenised once, up front (the fast tokenizers batch-encode in Rust); a batch is then
cut from the buffer and padded to a bucketed length, so batching costs a few array copies.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from jaxpref.data import errors
from jaxpref.data.records import DataSummary, PreferenceItem

SPECIAL_TOKENS = ("auto", "paper", "paper_before_eos", "tokenizer", "none")
# The official code's rows: BOS + text + EOS in `max_length` tokens, read at the token before the
# EOS. A causal decoder's state there does not see the EOS, so the EOS is left off: the rows are
# BOS + text in `max_length - 1` tokens, and `last` pooling reads the same state.
PAPER_BEFORE_EOS = "paper_before_eos"
_ENCODE_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
  """How texts become token ids.

  Attributes:
    max_length: longest row, special tokens included.
    truncation_side: `left` (the paper's choice: keep the end of the conversation, where the
      responses differ) or `right`.
    padding_side: `right` (default) or `left`; the model finds the last real token either way.
    special_tokens: `auto`: the tokenizer's own special tokens (Llama's BOS, BERT's CLS/SEP)
      plus EOS at the end when the tokenizer does not end a text with it, so `last`/`eos`
      pooling reads an end-of-text token; `paper`: BOS + text + EOS as in the paper's code;
      `paper_before_eos`: the paper's code as its `last` pooling reads it (the token before the
      appended EOS): BOS + text, in rows one token shorter than `max_length` (`row_length`;
      causal decoders with `last` pooling only);
      `tokenizer`: only what the tokenizer adds itself; `none`: nothing (e.g. for texts rendered
      with a chat template, which writes its own). Special tokens are kept when a text is cut:
      truncation removes text tokens only, as a Hugging Face tokenizer does. A text that
      already holds special tokens keeps them (as a plain tokenizer call would).
    buckets: padded lengths a batch may take; default `length_buckets(max_length)`.
    affixes: explicit (prefix ids, suffix ids), e.g. from an `InputContract`; overrides
      `special_tokens`.
    strip_pad_id: trailing tokens with this id are dropped from each row (transformers'
      `*ForSequenceClassification` pools the last token that is not the pad id; for a causal
      decoder dropping them gives the same reward).
  """

  max_length: int = 512
  truncation_side: str = "left"
  padding_side: str = "right"
  special_tokens: str = "auto"
  buckets: tuple[int, ...] | None = None
  affixes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
  strip_pad_id: int | None = None

  def __post_init__(self):
    if self.max_length < 2:
      raise errors.DataConfigError(f"max_length={self.max_length} must be at least 2")
    for name, value in (
      ("truncation_side", self.truncation_side),
      ("padding_side", self.padding_side),
    ):
      if value not in ("left", "right"):
        raise errors.DataConfigError(f"{name}={value!r}: choose left or right")
    if self.special_tokens not in SPECIAL_TOKENS:
      raise errors.DataConfigError(
        f"special_tokens={self.special_tokens!r}: choose one of {SPECIAL_TOKENS}"
      )
    if self.buckets is not None:
      if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] != self.max_length:
        raise errors.DataConfigError(
          f"buckets={self.buckets} must be increasing and end at max_length={self.max_length}"
        )

  @property
  def bucket_lengths(self) -> tuple[int, ...]:
    return self.buckets or length_buckets(self.max_length)

  def resolve_affixes(self, tokenizer: Any) -> tuple[list[int], list[int]]:
    if self.affixes is not None:
      return list(self.affixes[0]), list(self.affixes[1])
    return special_affixes(tokenizer, self.special_tokens)


def length_buckets(max_length: int, min_bucket: int = 32, multiple: int = 0) -> tuple[int, ...]:
  """Padded lengths a batch may take, ending at `max_length`.

  With `multiple=0`, powers of two from `min_bucket` (few shapes, so few compilations, but up to
  half of a batch can be padding). With `multiple=m`, `min_bucket` and then every multiple of m
  above it: a batch pads to less than m past its longest row, at the price of up to
  `max_length / m` compiled shapes.
  """
  if min_bucket < 1 or multiple < 0:
    raise ValueError(f"min_bucket={min_bucket} must be >= 1 and multiple={multiple} >= 0")
  buckets = []
  b = min_bucket
  while b < max_length:
    buckets.append(b)
    b = (b // multiple + 1) * multiple if multiple else b * 2
  return (*buckets, max_length)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `n` tokens."""
  for b in buckets:
    if n <= b:
      return int(b)
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def load_tokenizer(
  path: str | Path,
  *,
  eos_token: str | None = None,
  bos_token: str | None = None,
  pad_token: str | None = None,
) -> Any:
  """A Hugging Face tokenizer from a model directory or a `tokenizer.json` file, offline.

  A bare `tokenizer.json` does not say which token ends a text; when it declares exactly one
  special token (GPT-2's `<|endoftext|>`) that token becomes BOS and EOS, as GPT-2's own config
  says. A tokenizer without a pad token pads with EOS (the Hugging Face convention; the padded
  positions are masked, so the id does not matter). The paper's code instead forced Llama's
  ids (pad 3, bos 1, eos 2) onto every tokenizer, Pythia's included, where they are other tokens.

  Args:
    path: a directory with `tokenizer.json` / `tokenizer_config.json`, or a `tokenizer.json`.
    eos_token, bos_token, pad_token: override the tokenizer's special tokens.
  """
  import transformers  # Slow import; only tokenising code needs it.

  path = Path(path)
  if path.is_dir():
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
      raise errors.DataConfigError(f"{path}: cannot load a tokenizer: {e}") from None
  elif path.is_file():
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    if tokenizer.eos_token is None and eos_token is None:
      specials = [
        t["content"]
        for t in json.loads(path.read_text()).get("added_tokens", [])
        if t.get("special")
      ]
      if len(specials) == 1:
        eos_token = specials[0]
        bos_token = bos_token or specials[0]
        logging.info(
          "tokenizer %s: using its one special token %r as BOS and EOS", path, specials[0]
        )
  else:
    raise FileNotFoundError(f"{path}: no tokenizer directory or tokenizer.json file")
  for name, value in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
    if value is not None:
      setattr(tokenizer, name, value)
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise errors.DataConfigError(
        f"tokenizer {path} has neither a pad nor an EOS token; pass pad_token="
      )
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def options_for(
  contract: Any,
  *,
  max_length: int,
  truncation_side: str,
  padding_side: str,
  special_tokens: str,
  buckets: Sequence[int] | None,
) -> TokenizeOptions:
  """A model's `InputContract` options (with these buckets), or these settings without one."""
  buckets = tuple(buckets) if buckets else None
  if contract is not None:
    return contract.tokenize_options(buckets)
  return TokenizeOptions(
    max_length=max_length,
    truncation_side=truncation_side,
    padding_side=padding_side,
    special_tokens=special_tokens,
    buckets=buckets,
  )


def row_length(max_length: int, mode: str) -> int:
  """The longest row `max_length` gives with special-token mode `mode`.

  `max_length` itself, except for `paper_before_eos`, where `max_length` counts the EOS that the
  official code appends and its pooled token never sees: rows are one token shorter, so a text
  is cut to the same tokens as there.
  """
  return max_length - 1 if mode == PAPER_BEFORE_EOS else max_length


def special_affixes(tokenizer: Any, mode: str) -> tuple[list[int], list[int]]:
  """(prefix ids, suffix ids) that `mode` puts around each text."""
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  if mode == "none":
    return [], []
  if mode == "paper":
    return [bos] if bos is not None else [], [eos] if eos is not None else []
  if mode == PAPER_BEFORE_EOS:
    return [bos] if bos is not None else [], []
  sample = "a b"
  plain = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
  full = list(tokenizer(sample, add_special_tokens=True)["input_ids"])
  for k in range(len(full) - len(plain) + 1):
    if full[k : k + len(plain)] == plain:
      prefix, suffix = full[:k], full[k + len(plain) :]
      break
  else:
    raise errors.DataConfigError(
      "cannot tell which special tokens the tokenizer adds; use special_tokens='paper'/'none'"
    )
  if mode == "auto" and eos is not None and eos not in suffix[-1:]:
    suffix = [*suffix, eos]
  return prefix, suffix


@dataclasses.dataclass(frozen=True)
class TokenizedItems:
  """The responses of a list of items as one flat token buffer.

  Attributes:
    task: task name.
    token_ids: int32 [total tokens], every real response's tokens one after the other.
    starts_r: int64 [R], where response r starts in `token_ids` (R: responses of all items).
    lengths_r: int32 [R], its length after truncation (0 for a padding response).
    scores_r: float32 [R].
    item_starts: int64 [I + 1], item i owns responses `item_starts[i]:item_starts[i + 1]`.
    num_truncated: items with at least one response cut to `max_length`.
    pad_id: the id written into padded positions.
  """

  task: str
  token_ids: np.ndarray
  starts_r: np.ndarray
  lengths_r: np.ndarray
  scores_r: np.ndarray
  item_starts: np.ndarray
  num_truncated: int
  pad_id: int

  def __len__(self) -> int:
    return len(self.item_starts) - 1

  @property
  def responses_per_item(self) -> np.ndarray:
    return np.diff(self.item_starts)

  @functools.cached_property
  def item_lengths(self) -> np.ndarray:
    """int32 [I]: the longest response of each item."""
    if not len(self):
      return np.zeros(0, np.int32)
    return np.maximum.reduceat(self.lengths_r, self.item_starts[:-1]).astype(np.int32)


def encode_texts(
  texts: Sequence[str], tokenizer: Any, options: TokenizeOptions
) -> tuple[list[np.ndarray], np.ndarray]:
  """Token ids of each text as the input contract says, and which texts were cut.

  The one tokenisation path of jaxpref: training, evaluation and `jaxpref.score` all call it.
  Equal to `tokenizer(texts, truncation=True)` for a tokenizer configured by
  `jaxpref.data.contract.apply` (whose `model_max_length` is `row_length(max_length, mode)`),
  then dropping trailing `strip_pad_id` tokens.
  """
  prefix, suffix = options.resolve_affixes(tokenizer)
  budget = row_length(options.max_length, options.special_tokens) - len(prefix) - len(suffix)
  if budget < 1:
    raise errors.DataConfigError(
      f"max_length={options.max_length} ({options.special_tokens}) leaves no room for text "
      f"next to {len(prefix) + len(suffix)} special tokens"
    )
  pad = options.strip_pad_id
  rows, cut = [], np.zeros(len(texts), bool)
  for lo in range(0, len(texts), _ENCODE_CHUNK):
    encoded = tokenizer(
      list(texts[lo : lo + _ENCODE_CHUNK]),
      add_special_tokens=False,
      return_attention_mask=False,
      verbose=False,
    )["input_ids"]
    for r, ids in enumerate(encoded, start=lo):
      if len(ids) > budget:
        cut[r] = True
        ids = ids[len(ids) - budget :] if options.truncation_side == "left" else ids[:budget]
      row = [*prefix, *ids, *suffix]
      if pad is not None:
        end = len(row)
        while end > 1 and row[end - 1] == pad:
          end -= 1
        row = row[:end]
      rows.append(np.asarray(row, np.int32))
  return rows, cut


def tokenize_items(
  items: Sequence[PreferenceItem],
  tokenizer: Any,
  options: TokenizeOptions = TokenizeOptions(),
  *,
  summary: DataSummary | None = None,
  task: str | None = None,
) -> TokenizedItems:
  """Tokenises every real response (score >= 0) of `items`; padding responses get length 0.

  Args:
    items: preference items (of one task, normally).
    tokenizer: a Hugging Face tokenizer (`load_tokenizer`).
    options: lengths, sides and special tokens.
    summary: if given, its `truncated` count is increased by the items cut here.
    task: name stored on the result; default the first item's task.
  """
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    raise errors.DataConfigError("the tokenizer has no pad token; load it with load_tokenizer")
  scores_r = np.asarray([s for item in items for s in item.scores], np.float32)
  counts = [item.num_responses for item in items]
  item_starts = np.zeros(len(items) + 1, np.int64)
  np.cumsum(counts, out=item_starts[1:])
  texts = [t for item in items for t, s in zip(item.texts, item.scores) if s >= 0]
  real_r = np.flatnonzero(scores_r >= 0)
  pieces, cut = encode_texts(texts, tokenizer, options)
  lengths_r = np.zeros(len(scores_r), np.int32)
  cut_r = np.zeros(len(scores_r), bool)
  lengths_r[real_r] = [len(p) for p in pieces]
  cut_r[real_r] = cut
  token_ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  starts_r = np.zeros(len(scores_r), np.int64)
  starts_r[real_r] = np.concatenate([[0], np.cumsum(lengths_r[real_r])[:-1]]) if len(real_r) else 0
  num_truncated = int(np.logical_or.reduceat(cut_r, item_starts[:-1]).sum()) if len(items) else 0
  if summary is not None:
    summary.truncated += num_truncated
  name = task or (items[0].task if len(items) else "")
  if num_truncated:
    logging.info(
      "tokenised %s: %d of %d items had a response cut to %d tokens (%s side)",
      name,
      num_truncated,
      len(items),
      row_length(options.max_length, options.special_tokens),
      options.truncation_side,
    )
  return TokenizedItems(
    task=name,
    token_ids=token_ids,
    starts_r=starts_r,
    lengths_r=lengths_r,
    scores_r=scores_r,
    item_starts=item_starts,
    num_truncated=num_truncated,
    pad_id=int(pad_id),
  )


def collate(
  rows: Sequence[tuple[TokenizedItems, int, int] | None],
  num_responses: int,
  length: int,
  padding_side: str = "right",
  pad_id: int | None = None,
) -> dict[str, np.ndarray]:
  """Builds a batch from (tokenized items, item index, task id) rows; None makes a dummy row.

  Returns:
    `input_ids` int32 [B, N, L], `attention_mask` int32 [B, N, L], `scores` float32 [B, N]
    (-1 for padding responses and dummy rows), `task_ids` int32 [B] (0 for dummy rows).
  """
  batch = len(rows)
  if pad_id is None:
    pad_id = next((r[0].pad_id for r in rows if r is not None), 0)
  input_ids = np.full((batch, num_responses, length), pad_id, np.int32)
  mask = np.zeros((batch, num_responses, length), np.int32)
  scores = np.full((batch, num_responses), -1.0, np.float32)
  task_ids = np.zeros(batch, np.int32)
  for b, row in enumerate(rows):
    if row is None:
      continue
    tok, i, task_id = row
    task_ids[b] = task_id
    lo, hi = tok.item_starts[i], tok.item_starts[i + 1]
    if hi - lo > num_responses:
      raise errors.DataConfigError(
        f"task {tok.task!r} item {i} has {hi - lo} responses; responses_per_item is {num_responses}"
      )
    scores[b, : hi - lo] = tok.scores_r[lo:hi]
    for n, r in enumerate(range(lo, hi)):
      size = int(tok.lengths_r[r])
      if not size:
        continue
      start = 0 if padding_side == "right" else length - size
      input_ids[b, n, start : start + size] = tok.token_ids[
        tok.starts_r[r] : tok.starts_r[r] + size
      ]
      mask[b, n, start : start + size] = 1
  return {"input_ids": input_ids, "attention_mask": mask, "scores": scores, "task_ids": task_ids}
