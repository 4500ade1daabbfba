"""Tiny random transformers models of the newer families, for the parity and round-trip tests."""

from __future__ import annotations

import numpy as np

from jaxpref.models.config import ModelConfig

VOCAB, PAD = 211, 0
TINY_HF = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  intermediate_size=96,
  max_position_embeddings=32,
  initializer_range=0.2,
  pad_token_id=PAD,
  attn_implementation="eager",
)
# name -> (transformers config class, config kwargs). Windows of 4 tokens, texts of up to 10.
VARIANTS = {
  "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
  "qwen2_sliding": (
    "Qwen2Config",
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
  ),
  "mistral": ("MistralConfig", dict(sliding_window=4, head_dim=24)),
  "qwen3": ("Qwen3Config", dict(head_dim=24, attention_bias=True)),
  "qwen3_moe": (
    "Qwen3MoeConfig",
    dict(
      head_dim=16,
      num_experts=4,
      num_experts_per_tok=2,
      moe_intermediate_size=40,
      norm_topk_prob=True,
    ),
  ),
  "gemma2": (
    "Gemma2Config",
    dict(
      head_dim=16,
      sliding_window=4,
      attn_logit_softcapping=5.0,
      final_logit_softcapping=3.0,
      query_pre_attn_scalar=20,
    ),
  ),
  "gemma3": (
    "Gemma3TextConfig",
    dict(
      head_dim=16,
      num_hidden_layers=3,
      sliding_window=4,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
      query_pre_attn_scalar=20,
      rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
      },
    ),
  ),
}
LENGTHS = [10, 3, 7, 1]


def hf_model(torch, variant: str, seed: int = 0):
  """A tiny random transformers `*ForSequenceClassification` (num_labels=1) of a variant."""
  import transformers

  config_cls, overrides = VARIANTS[variant]
  config = getattr(transformers, config_cls)(**(TINY_HF | overrides), num_labels=1)
  model_cls = getattr(transformers, config_cls.removesuffix("Config") + "ForSequenceClassification")
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


def tokens(lengths, length, *, left: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, (len(lengths), length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  if left:
    ids = np.stack([np.roll(row, length - n) for row, n in zip(ids, lengths)])
    mask = mask[:, ::-1].copy()
  return np.where(mask > 0, ids, PAD), mask


def hf_run(torch, model, ids, mask):
  """transformers rewards and hidden states with jaxpref's positions (0 at each first token)."""
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(positions),
      output_hidden_states=True,
    )
  return out.logits[:, 0].float().numpy(), np.stack([h.float().numpy() for h in out.hidden_states])


# jaxpref's own tiny decoders (no transformers needed), for the packing tests.
_TINY_NATIVE = dict(
  vocab_size=97,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  intermediate_size=48,
  max_position_embeddings=64,
  initializer_range=0.2,
)
NATIVE_DECODERS = {
  "gpt_neox": ModelConfig(arch="gpt_neox", rotary_pct=0.25, **_TINY_NATIVE),
  "llama": ModelConfig(arch="llama", num_kv_heads=2, hidden_act="silu", **_TINY_NATIVE),
}
