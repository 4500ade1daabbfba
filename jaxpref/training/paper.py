"""The paper's training runs (Zeng et al., arXiv 2312.07401, Section 5) as configs.

Five preference datasets as five tasks, each resampled to 40,000 training pairs, one epoch, global
batch of 80 (16 pairs from each dataset), AdamW at lr 1e-6, max length 512, a linear head on the
last token; MORE with momentum alpha 0.99 and l2 normalisation. Paths point at local copies that
the user fills in (`--config.model.path=...`, `--config.data.files=...`): nothing is downloaded.

Settings the paper leaves open follow the official code (dunzeng/MORE, its README's command and
the Hugging Face Trainer defaults it runs on), listed in `OFFICIAL` and docs/objectives.md:
the learning rate decays linearly to 0 without warmup (the Trainer's default `linear` schedule);
tied comparisons are kept (the official data loader keeps them and its loss masks tied pairs
out) and a task whose items all tie in a batch still counts as one of the batch's tasks
(`loss.task_presence=items`); the reward is read where the official `last` pooling reads it, at
the token before the appended EOS (`data.special_tokens=paper_before_eos`). jaxpref's own
preferences are one override each: `--config.train.schedule=constant
--config.data.on_tie=skip --config.loss.task_presence=pairs --config.data.special_tokens=auto`.

The `tiny` variant (`--config=configs/<file>.py:tiny`) keeps every setting that does not need the
real checkpoint or data and runs a few steps of a random-init model on the shared CPU data.
"""

from __future__ import annotations

import ml_collections

from jaxpref.data import shared
from jaxpref.training.config import base_config

PAPER_TASKS = ("helpful", "harmless", "oasst1", "webgpt", "summarize")
PAPER_MODELS = {
  # config name -> (preset name in jaxpref.models.presets, default local checkpoint path)
  "pythia-1.4b": ("pythia-1.4b", "/path/to/checkpoints/pythia-1.4b"),
  "pythia-2.8b": ("pythia-2.8b", "/path/to/checkpoints/pythia-2.8b"),
  "llama-2-7b": ("llama-2-7b", "/path/to/checkpoints/Llama-2-7b-hf"),
  "llama-2-13b": ("llama-2-13b", "/path/to/checkpoints/Llama-2-13b-hf"),
}


# The official run's values for what the paper does not state (tests check the configs against
# these; docs/objectives.md lists them with jaxpref's alternatives).
OFFICIAL = {
  "train.schedule": "linear",  # HF Trainer lr_scheduler_type default
  "train.end_lr_fraction": 0.0,  # linear decay to 0
  "train.warmup_steps": 0,  # HF Trainer warmup_steps default
  "train.weight_decay": 0.0,  # HF Trainer weight_decay default
  "data.on_tie": "keep",  # ties kept in the data; the loss masks tied pairs out
  "loss.task_presence": "items",  # a tie-only task still counts (task_num, its MORE weight)
  # BOS + text + EOS, read at the token before EOS (`sequence_lengths - 2` in model.py)
  "data.special_tokens": "paper_before_eos",
  "data.truncation_side": "left",  # --truncation_side left
  "data.max_length": 512,  # --max_length 512
  "train.learning_rate": 1e-6,  # --learning_rate 1e-6
  "loss.more_alpha": 0.99,  # --alpha 0.99
  "loss.more_normalize": "l2",  # --normalize l2
  "data.resampling_size": 40_000,  # --resampling_size 40000
}


def paper_config(model: str, objective: str, variant: str = "") -> ml_collections.ConfigDict:
  """The paper's run of `model` with `objective` (`multitask` or `more`)."""
  if model not in PAPER_MODELS:
    raise ValueError(f"unknown paper model {model!r}; choose one of {sorted(PAPER_MODELS)}")
  if objective not in ("multitask", "more"):
    raise ValueError(f"objective={objective!r}: the paper compares multitask and more")
  preset, path = PAPER_MODELS[model]
  c = base_config()
  c.model.path = path
  c.model.preset = preset  # Used for shapes (AOT / memory plans) when the path is absent.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.model.pooling = "last"
  c.data.files = ",".join(f"/path/to/data/{task}.jsonl" for task in PAPER_TASKS)
  c.data.task_names = ",".join(PAPER_TASKS)
  c.data.on_tie = "keep"  # As the official run: tied items stay (their pairs add no loss),
  c.loss.task_presence = "items"  # and their task counts in the loss's task factor and MGDA.
  c.data.special_tokens = "paper_before_eos"  # The official `last` pooling's position.
  c.data.max_length = 512
  c.data.truncation_side = "left"
  c.data.mixing = "resample"
  c.data.resampling_size = 40_000
  c.data.eval_fraction = 0.0  # The paper evaluates on the datasets' own test splits.
  c.train.batch_size = 80  # 16 groups of one pair from each of the 5 datasets.
  c.train.steps = 0  # One epoch: 5 x 40,000 / 80 = 2,500 steps.
  c.train.learning_rate = 1e-6
  c.train.warmup_steps = 0
  c.train.schedule = "linear"  # The official run's (HF Trainer default): linear decay to 0.
  c.train.end_lr_fraction = 0.0
  c.train.weight_decay = 0.0
  c.loss.kind = objective
  c.loss.more_alpha = 0.99
  c.loss.more_normalize = "l2"
  c.checkpoint.every_steps = 250
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  if variant == "tiny":
    preferences = shared.preferences_dir()
    c.model.path = ""
    c.model.preset = ""
    c.model.arch = "llama" if model.startswith("llama") else "gpt_neox"
    c.model.vocab_size = 50304
    c.model.hidden_size = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.intermediate_size = 64
    c.model.dtype = "float32"
    c.model.remat = False
    c.data.files = ",".join(
      str(preferences / f"{t}.json") for t in ("helpful", "harmless", "webgpt")
    )
    c.data.task_names = "helpful,harmless,webgpt"
    c.data.tokenizer = str(shared.gpt2_tokenizer_file())
    c.data.max_length = 64
    c.data.resampling_size = 40
    c.data.eval_fraction = 0.1
    c.train.batch_size = 6
    c.train.steps = 3
    c.mesh.fsdp = -1
    c.checkpoint.every_steps = 2
  elif variant:
    raise ValueError(f"unknown config variant {variant!r}; the only variant is 'tiny'")
  return c
