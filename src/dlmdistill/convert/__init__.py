"""Checkpoint converters: published DLM checkpoints into native ``transformers`` model folders.

Each converter writes a folder that ``AutoModelForCausalLM.from_pretrained`` loads without remote
code: a decoder class with ``is_causal=False`` (bidirectional attention), plus the config
attributes ``mask_token_id`` and ``dlm_shift_logits``, and the tokenizer with its mask token.

* :func:`convert_llada` -- LLaDA (``GSAI-ML/LLaDA-8B-*``) -> ``LlamaForCausalLM``
* :func:`convert_dream` -- Dream (``Dream-org/Dream-v0-*-7B``) -> ``Qwen2ForCausalLM`` (shifted logits)
* :func:`convert_smdm` -- SMDM lit-gpt ``Diff_LLaMA_*`` checkpoints -> ``LlamaForCausalLM``
* :func:`convert_ar` -- any transformers decoder, loaded as a bidirectional DLM and saved

A converter writes into a hidden temporary folder beside the destination and renames it at the
end: the destination appears complete or not at all.
"""

from .ar import convert_ar
from .common import ConversionError
from .dream import convert_dream
from .llada import convert_llada
from .smdm import convert_smdm

__all__ = ["ConversionError", "convert_ar", "convert_dream", "convert_llada", "convert_smdm"]
