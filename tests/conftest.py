"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxpref.data import shared

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = shared.shared_dir()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """The project's shared data folder (`../shared`); tests that need it skip when it is absent."""
  if not (SHARED_DIR / "data" / "preferences").is_dir():
    pytest.skip(f"shared data not found at {SHARED_DIR} (set JAXPREF_SHARED to its path)")
  return SHARED_DIR


@pytest.fixture(scope="session")
def preferences_dir(shared_dir: Path) -> Path:
  return shared_dir / "data" / "preferences"


@pytest.fixture(scope="session")
def gpt2_tokenizer_file(shared_dir: Path) -> Path:
  path = shared_dir / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
  if not path.is_file():
    pytest.skip(f"GPT-2 tokenizer not found at {path}")
  return path
