"""The CPU-scale sweep on helpful / harmless / webgpt: model size x data size x objective x seed.

  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_scaling.py --workdir=DIR
  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_scaling.py:smoke ...
  (add --report_only to tabulate the finished cells; a rerun skips them)

`base` is an ordinary training config (see `jaxpref.training.config`); `sweep` says which cells to
run (every key: `jaxpref.experiments.sweep_config`). Model specs are
`name=decoder:hidden:layers:heads:intermediate` (random init) or `name=minilm:layers` (the
pretrained all-MiniLM-L6-v2 encoder truncated to its first layers). The three tasks are the
paper's own sets, with helpful and harmless known to pull a shared RM in opposite directions;
`cpu_domains.py` is the purer (and faster-learning) diverse-preference setting.

Cells: at the headline point (minilm2, 2,000 items per task) MultiTask, MORE and the three
single-task RMs with 3 seeds (15 cells); with MultiTask and seed 0, dec and minilm6 at 2,000
items per task and minilm2 at 100 (3 cells). Each trains 100 steps of 12 items (4 per task;
single-task: 4 of its task), the last 64 tokens of each conversation. Cost measured on 2
otherwise idle cores: minilm2 MultiTask ~80 s a cell, single-task ~30 s, minilm6 ~230 s; about
18 minutes in all. The smoke variant (a 16-wide decoder, 3 steps, 5 cells) takes about a minute.
"""

import ml_collections

from jaxpref.data import shared
from jaxpref.experiments.sweep_config import base_sweep_config
from jaxpref.training.config import base_config

SHARED = shared.shared_dir()
PREFERENCES = SHARED / "data" / "preferences"


def _base(smoke: bool) -> ml_collections.ConfigDict:
  c = base_config()
  # The random-init decoders (MiniLM cells take model and tokenizer from their copy).
  c.model.arch = "gpt_neox"
  c.model.vocab_size = 50304
  c.model.rotary_pct = 0.25
  c.model.max_position_embeddings = 2048
  c.data.files = ",".join(
    str(PREFERENCES / f) for f in ("helpful.json", "harmless.json", "webgpt.json")
  )
  c.data.tokenizer = str(shared.gpt2_tokenizer_file())
  c.data.on_tie = "skip"  # webgpt's tied pairs carry no preference.
  # Left truncation keeps the end of the conversation: the final answers, where pairs differ.
  c.data.max_length = 32 if smoke else 64
  c.data.min_bucket = 32
  c.data.eval_fraction = 0.03 if smoke else 0.1
  c.train.batch_size = 12  # 4 items of each of the 3 tasks; single-task runs use 4.
  c.train.steps = 3 if smoke else 100
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 1 if smoke else 10
  c.train.weight_decay = 0.01
  c.train.log_every_steps = 1 if smoke else 10
  c.checkpoint.every_steps = 100_000  # Only the final save.
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
  c.sweep = base_sweep_config()
  c.sweep.shared_root = str(SHARED)
  c.sweep.minilm_learning_rate = 1e-4
  if smoke:
    c.sweep.models = "dec16=decoder:16:1:2:32"
    c.sweep.data_sizes = "48"
    c.sweep.seeds = "0"
    c.sweep.headline_model = "dec16"
    c.sweep.headline_data_size = 48
  else:
    c.sweep.models = "dec=decoder:128:2:4:512,minilm2=minilm:2,minilm6=minilm:6"
    # 100 steps x 4 items = 400 items per task: 100/task repeats each item 4 times.
    c.sweep.data_sizes = "100,2000"
    c.sweep.seeds = "0,1,2"
    c.sweep.headline_model = "minilm2"
    c.sweep.headline_data_size = 2000
    # The axes (one seed) with MultiTask only: MORE vs MultiTask is read at the headline point,
    # where 3 seeds give a spread; one seed elsewhere could not resolve it.
    c.sweep.axis_objectives = "multitask"
  # To bound the cost on 2 CPU cores the grid is a cross, not a product: every model at the
  # headline data size, every data size with the headline model. Seeds beyond the first and the
  # single-task objective run only at the headline (model, data size) point.
  return c
