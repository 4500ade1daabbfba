"""Where the project's shared data lives: the one helper every config, benchmark and test uses.

`JAXPREF_SHARED=/path` wins. Otherwise the first `shared/` folder holding `data/` found beside the
current directory or any of its parents, then beside the installed package or any of its parents
(an editable clone with `../shared` next to it). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "JAXPREF_SHARED"


def _candidates() -> list[Path]:
  bases = [Path.cwd().resolve(), Path(__file__).resolve().parent]
  return [d / "shared" for base in bases for d in (base, *base.parents)]


def shared_dir() -> Path:
  """The shared data folder (it may not exist; callers that need it say so in one line)."""
  if os.environ.get(SHARED_ENV):
    return Path(os.environ[SHARED_ENV])
  for candidate in _candidates():
    if (candidate / "data").is_dir():
      return candidate
  return Path.cwd().resolve().parent / "shared"


def preferences_dir() -> Path:
  """The folder of the shared preference files (helpful.json, harmless.json, ...)."""
  return shared_dir() / "data" / "preferences"


def gpt2_tokenizer_file() -> Path:
  """The offline GPT-2 tokenizer.json the tiny configs use."""
  return shared_dir() / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
