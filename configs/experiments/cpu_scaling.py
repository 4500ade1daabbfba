"""The CPU-scale sweep of `jaxpref.experiments.scaling`: model size x data size x objective x seed.

  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_scaling.py --workdir=DIR
  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_scaling.py:smoke ...

`base` is an ordinary training config (see `jaxpref.train_config`); `sweep` says which cells to
run. Model specs are `name=decoder:hidden:layers:heads:intermediate` (random init) or
`name=minilm:layers` (the pretrained all-MiniLM-L6-v2 encoder truncated to its first layers).
"""

import os
from pathlib import Path

import ml_collections

from jaxpref.train_config import base_config

SHARED = Path(os.environ.get("JAXPREF_SHARED", Path(__file__).resolve().parents[3] / "shared"))
PREFERENCES = SHARED / "data" / "preferences"


def _base(smoke: bool) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.arch = "gpt_neox"
  c.model.vocab_size = 50304
  c.model.rotary_pct = 0.25
  c.model.max_position_embeddings = 2048
  c.data.files = ",".join(
    str(PREFERENCES / f) for f in ("helpful.json", "harmless.json", "webgpt.json")
  )
  c.data.tokenizer = str(SHARED / "data" / "tokenizers" / "gpt2" / "tokenizer.json")
  c.data.on_tie = "skip"  # webgpt's tied pairs carry no preference.
  c.data.max_length = 32 if smoke else 64
  c.data.min_bucket = 32
  c.data.eval_fraction = 0.1
  c.train.batch_size = 12  # 4 items of each of the 3 tasks; single-task runs use 4.
  c.train.steps = 3 if smoke else 60
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 1 if smoke else 8
  c.train.weight_decay = 0.01
  c.train.log_every_steps = 1 if smoke else 5
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.eval.batch_size = 64
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/experiments/cpu_scaling.py: unknown variant {arg!r} (use 'smoke')")
  c = ml_collections.ConfigDict()
  c.base = _base(smoke)
  c.sweep = ml_collections.ConfigDict()
  # Learning rate per model family: random decoders like 1e-3, a pretrained encoder less.
  c.sweep.minilm_learning_rate = 1e-4
  if smoke:
    c.sweep.models = "dec16=decoder:16:1:2:32"
    c.sweep.data_sizes = "48"
    c.sweep.objectives = "single,multitask,more"
    c.sweep.seeds = "0"
    c.sweep.headline_model = "dec16"
    c.sweep.headline_data_size = 48
  else:
    c.sweep.models = "dec32=decoder:32:1:2:64,dec128=decoder:128:2:4:512,minilm2=minilm:2"
    c.sweep.data_sizes = "100,800"
    c.sweep.objectives = "single,multitask,more"
    c.sweep.seeds = "0,1,2"
    c.sweep.headline_model = "dec128"
    c.sweep.headline_data_size = 800
  # To bound the cost on 2 CPU cores the grid is a cross, not a product: every model at the
  # headline data size, every data size with the headline model. Seeds beyond the first and the
  # single-task objective run only at the headline (model, data size) point.
  return c
