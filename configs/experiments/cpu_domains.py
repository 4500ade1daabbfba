"""Diverse preferences in their purest form, at CPU scale: the four domains of the DSP set.

  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_domains.py --workdir=DIR
  python -m jaxpref.experiments.scaling --config=configs/experiments/cpu_domains.py:smoke ...
  (add --report_only to tabulate the finished cells; a rerun skips them)

`domain_specific.json` (Cheng et al., 2023) answers each of 661 Alpaca queries once per domain
(academy, business, entertainment, literature) and once plainly; in task `dsp_<domain>` that
domain's answer beats the four others. Read with `data.on_error=skip` (144 `duplicate_text` and
4 `empty_text` pairs dropped), ONE file gives four tasks of ~2,600 pairs each, so single-task
cells select theirs with `data.tasks` (every task keeps the same prompt-hash held-out split).

Why a config of its own rather than a variant of cpu_scaling.py: the preferences here contradict
each other on the very same pairs (`academy > business` in one task, `business > academy` in
another), so the three objectives separate sharply: single-task RMs are the upper bound; a
shared RM (MultiTask, MORE) gets exactly one of each contradicting pair right, which caps its
accuracy over the four tasks at about (6 + 4) / 16 = 0.625 (per query: 12 ordered domain pairs
of which 6 can be right, plus 4 `domain > normal` pairs that all can); the question is how MORE
and MultiTask share that budget between tasks (results.md's "worst task" column), and how
calibrated each is. The MiniLM encoder (2, 4, 6 pretrained layers) carries the model-size axis;
`dec` is a random-init decoder, the "no pretraining" reference.

Cells: at the headline point (minilm2, 2,000 of the ~2,360 training items per domain)
MultiTask, MORE and the four single-task RMs with 3 seeds (18 cells); dec, minilm4 and minilm6
with MultiTask, seed 0 (3 cells). Each trains 100 steps of 16 items (4 per domain; single-task:
4 of its domain), the first 64 tokens of each text. Cost measured on 2 otherwise idle cores:
minilm2 MultiTask ~85 s a cell, single-task ~26 s, minilm4 ~136 s, minilm6 ~206 s; about 20
minutes in all. The smoke variant (2 domains, 1-layer MiniLM, 3 steps, 4 cells) takes about a
minute.
"""

import ml_collections

from jaxpref.data import shared
from jaxpref.experiments.sweep_config import base_sweep_config
from jaxpref.training.config import base_config

SHARED = shared.shared_dir()
DOMAINS = ("academy", "business", "entertainment", "literature")


def _base(smoke: bool) -> ml_collections.ConfigDict:
  c = base_config()
  # The random-init reference decoder (MiniLM cells take model and tokenizer from their copy).
  c.model.arch = "gpt_neox"
  c.model.vocab_size = 50304
  c.model.rotary_pct = 0.25
  c.model.max_position_embeddings = 2048
  c.data.files = str(SHARED / "data" / "preferences" / "domain_specific.json")
  c.data.task_names = "dsp"  # Tasks dsp_<domain>.
  c.data.on_error = "skip"
  c.data.tokenizer = str(shared.gpt2_tokenizer_file())
  # Right truncation keeps the query and the start of the answer, where each domain's voice is
  # set (measured: minilm2 single-task, 100 steps, 64 tokens: academy 0.76 / business 0.73 held-out
  # accuracy against 0.69 / 0.64 keeping the end instead).
  c.data.truncation_side = "right"
  c.data.max_length = 32 if smoke else 64
  c.data.min_bucket = 32
  c.data.eval_fraction = 0.03 if smoke else 0.1  # Full: ~240 held-out pairs per domain.
  c.train.batch_size = 4 if smoke else 16  # Full: 4 items per domain; single-task cells: 4.
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
    raise ValueError(f"configs/experiments/cpu_domains.py: unknown variant {arg!r} (use 'smoke')")
  c = ml_collections.ConfigDict()
  c.base = _base(smoke)
  c.sweep = base_sweep_config()
  # The smoke variant keeps two domains: the plumbing is the same, at half the cells.
  c.sweep.tasks = ",".join(f"dsp_{d}" for d in (DOMAINS[:2] if smoke else DOMAINS))
  c.sweep.shared_root = str(SHARED)
  c.sweep.minilm_learning_rate = 1e-4
  if smoke:
    c.sweep.models = "minilm1=minilm:1"
    c.sweep.data_sizes = "32"
    c.sweep.seeds = "0"
    c.sweep.headline_model = "minilm1"
    c.sweep.headline_data_size = 32
  else:
    c.sweep.models = "dec=decoder:128:2:4:512,minilm2=minilm:2,minilm4=minilm:4,minilm6=minilm:6"
    c.sweep.data_sizes = "2000"  # Of ~2,360 training items per domain (cpu_scaling varies it).
    c.sweep.seeds = "0,1,2"
    c.sweep.headline_model = "minilm2"
    c.sweep.headline_data_size = 2000
    # The size axis (one seed) with MultiTask only: minilm6 costs ~3x minilm2 per step.
    c.sweep.axis_objectives = "multitask"
  return c
