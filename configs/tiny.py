"""A tiny random-init GPT-NeoX reward model on the shared helpful / harmless / webgpt files.

Three tasks, a few minutes on 2 CPU cores:
  python -m jaxpref.train --config=configs/tiny.py --workdir=/tmp/jaxpref_tiny
  python -m jaxpref.train --config=configs/tiny.py --config.loss.kind=more --workdir=...
"""

from jaxpref.data import shared
from jaxpref.training.config import base_config

PREFERENCES = shared.preferences_dir()


def get_config():
  c = base_config()
  c.model.arch = "gpt_neox"
  c.model.vocab_size = 50304  # GPT-2's 50,257 tokens rounded up.
  c.model.hidden_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.intermediate_size = 256
  c.model.rotary_pct = 0.25
  c.model.max_position_embeddings = 2048
  c.data.files = ",".join(
    str(PREFERENCES / f) for f in ("helpful.json", "harmless.json", "webgpt.json")
  )
  c.data.tokenizer = str(shared.gpt2_tokenizer_file())
  c.data.on_tie = "skip"  # webgpt.json has 245 tied pairs: no preference, counted and skipped.
  c.data.max_length = 128
  c.data.eval_fraction = 0.1
  c.data.resampling_size = 600
  c.train.batch_size = 12  # 4 items of each of the 3 tasks.
  c.train.steps = 150
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.01
  c.train.log_every_steps = 10
  c.loss.kind = "multitask"
  c.checkpoint.every_steps = 50
  c.eval.every_steps = 0
  c.eval.batch_size = 32
  return c
