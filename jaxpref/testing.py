"""Helpers for tests and smoke runs that must not need downloaded tokenizers or data."""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
UNK = "[UNK]"
# A chat template small enough to check by eye: `<role> content` per message.
TOY_CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


def word_tokenizer(
  texts: Iterable[str] = (), *, vocab_size: int = 512, words: Sequence[str] | None = None
) -> Any:
  """A word-level Hugging Face tokenizer: one token per whitespace-separated word.

  Token counts are then easy to know in a test (`len(text.split())`). Id 0 is `<|endoftext|>`
  (EOS and pad), id 1 `[UNK]`; the vocabulary is `words`, or the most frequent words of `texts`
  (ties broken alphabetically), cut to `vocab_size`.
  """
  import tokenizers
  import transformers

  if words is None:
    counts = collections.Counter(w for t in texts for w in t.split())
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
  vocab = {EOS: 0, UNK: 1}
  for w in words:
    if len(vocab) >= vocab_size:
      break
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([EOS])
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token=EOS, unk_token=UNK, pad_token=EOS
  )
  return hf


def write_records(path: str | Path, records: Sequence[Any], *, layout: str = "auto") -> Path:
  """Writes records as a JSON list (`.json`) or JSON lines (`.jsonl`), gzipped for `.gz`.

  Args:
    path: destination; its suffixes choose the layout unless `layout` is `list` or `lines`.
    records: JSON-serialisable records; a `str` record is written verbatim as one line (to test
      invalid JSON).
    layout: `auto`, `list` or `lines`.
  """
  path = Path(path)
  if layout == "auto":
    layout = "lines" if ".jsonl" in path.suffixes else "list"
  if layout == "list":
    text = json.dumps(list(records), ensure_ascii=False, indent=1)
  else:
    text = "".join(
      (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
    )
  data = text.encode()
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
  return path
