"""Generative fine-tuning: supervised fine-tuning (SFT) of decoders on prompt/response pairs.

Public names:

- :data:`EMBEDDED_DECODER` (``"embedded-smollm2"``): SmolLM2-135M-Instruct, converted once
  from the embedded GGUF into a cached float32 folder (:func:`smollm2_path`).
- :func:`load_causal_lm` ``(model_cfg_or_name) -> (model, tokenizer)``.
- :func:`load_instruction_pairs` ``(source="chatterbot", ...) -> [InstructionPair]``;
  :func:`split_pairs` (held-out split by prompt); :class:`InstructionDataset` (chat
  template, labels -100 on the prompt, optional packing); :class:`CausalLMCollator`
  (right padding); :func:`format_prompt` / :func:`encode_prompt`.
- :class:`CausalLMTask`: the trainer's Task (answer-token cross-entropy; evaluate gives
  ``loss``, ``perplexity``, ``token_accuracy``).
- :func:`generate` ``(model, tokenizer, prompts, ...) -> [str]``: batched, left-padded,
  key/value cache, temperature / top-p / max_new_tokens, streaming callback.

The ``deltatune train`` side (``model.task: causal-lm``) is :mod:`deltatune.lm.sft`.
"""

from deltatune.lm.generate import generate, left_pad
from deltatune.lm.instructions import (
    CHATTERBOT,
    IGNORE_INDEX,
    CausalLMCollator,
    InstructionConfig,
    InstructionDataset,
    InstructionPair,
    InstructionSplits,
    encode_answer,
    encode_prompt,
    format_prompt,
    load_chatterbot_pairs,
    load_instruction_pairs,
    load_pair_file,
    pack_examples,
    split_pairs,
)
from deltatune.lm.load import load_causal_lm
from deltatune.lm.smollm2 import cache_root, smollm2_path
from deltatune.lm.task import CausalLMTask
from deltatune.models import EMBEDDED_DECODER

__all__ = [
    "CHATTERBOT",
    "EMBEDDED_DECODER",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "CausalLMTask",
    "InstructionConfig",
    "InstructionDataset",
    "InstructionPair",
    "InstructionSplits",
    "cache_root",
    "encode_answer",
    "encode_prompt",
    "format_prompt",
    "generate",
    "left_pad",
    "load_causal_lm",
    "load_chatterbot_pairs",
    "load_instruction_pairs",
    "load_pair_file",
    "pack_examples",
    "smollm2_path",
    "split_pairs",
]
