"""Autoregressive (causal) language models: the LLM teachers and students of the KD baselines.

SelfFusion's Table 1 compares DLMs with LLMs trained on the same data, and distils LLMs into
DLMs. This module gives causal LMs the small interface the trainer, the evaluator and the KD
recipes need, next to ``DiffusionModel``:

* ``is_autoregressive_config`` / ``is_autoregressive_checkpoint``: the one place that decides
  whether a checkpoint is a causal LM (AR) or a DLM;
* ``CausalLM``: logits at chosen positions, aligned so that row ``i`` predicts token ``i`` from the
  clean prefix ``y_<i`` (the hidden state at ``i - 1``); export; left-to-right generation;
* ``ar_preset_config``: the built-in Llama presets with causal attention (from-scratch teachers);
* ``load_causal_lm``: a new preset model or a transformers causal checkpoint, optionally with LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..configs.generation import GenerationConfig
from .backbone import SPLITTABLE_MODEL_TYPES, export_model, left_pad, position_ids_from_mask
from .loading import DTYPES, ModelConfig, apply_lora, is_preset, load_tokenizer
from .presets import preset_config
from .tokenizer import ensure_pad_token


def is_autoregressive_config(config: Any) -> bool:
    """True for a causal LM: a ``*ForCausalLM`` / ``*LMHeadModel`` architecture whose attention was not
    made bidirectional (``is_causal`` is not False) and that has no diffusion mask id.

    DLMs exported by dlmdistill (and converted LLaDA/Dream) set ``is_causal=False`` and
    ``mask_token_id``; remote-code LLaDA/Dream and masked LMs have other architecture names.
    """
    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return (causal_arch and getattr(config, "is_causal", True) is not False
            and getattr(config, "mask_token_id", None) is None)


def is_autoregressive_checkpoint(path: str, **kwargs: Any) -> bool:
    """``is_autoregressive_config`` of a local folder or hub id (a LoRA adapter folder: of its base)."""
    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    if adapter.exists():
        path = json.loads(adapter.read_text())["base_model_name_or_path"]
    return is_autoregressive_config(AutoConfig.from_pretrained(path, **kwargs))


def ar_preset_config(name: str, vocab_size: int, **kwargs: Any):
    """The built-in preset ``name`` (``presets.PRESETS``) as a causal LM: same architecture, causal
    attention, no mask id. ``kwargs`` as for ``presets.preset_config`` (without ``mask_token_id``)."""
    config = preset_config(name, vocab_size, mask_token_id=-1, **kwargs)
    config.is_causal = True
    del config.mask_token_id, config.dlm_shift_logits
    return config


class CausalLM(nn.Module):
    """A transformers causal LM (possibly inside a ``PeftModel``) for training, KD and evaluation.

    Args:
        model: an ``XForCausalLM`` (or a ``PeftModel`` around one) with causal attention.
        pad_id, eos_id: special ids for batching and generation.
    """

    def __init__(self, model: nn.Module, *, pad_id: int | None = None, eos_id: int | None = None):
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        #: pass SDPA a ready [B, 1, L, L] causal mask instead of the [B, L] padding mask, so transformers does not
        #: read the mask back to see whether it can drop it (a device-to-host sync per forward; set by the KD
        #: trainer under ``training.static_shapes``), as ``DiffusionModel.static_attention_mask`` does
        self.static_attention_mask = False
        hf = self.hf_model
        self.splittable = getattr(hf.config, "model_type", None) in SPLITTABLE_MODEL_TYPES and \
            hf.get_output_embeddings() is not None and hasattr(hf, "model")

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def hf_model(self) -> nn.Module:
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def config(self):
        return self.hf_model.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.get_output_embeddings().weight.shape[0])

    def head(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits, aligned with the tokens they predict.

        input_ids: [B, L]; attention_mask: [B, L] or None; positions: [B, L] bool, the tokens to
        predict (position 0 has no prefix and cannot be one), or [B, K] long positions per row (a
        fixed shape; a row for token 0 is computed from position 0 and must be weighted 0 by the
        caller). Returns [N, V] in row-major order of ``positions``: row n is the distribution of token i given ``input_ids[b, :i]`` (computed at
        position ``i - 1``; the LM head only there when the model splits into body and head).
        """
        if positions is None:
            raise ValueError("CausalLM.forward needs positions (the tokens to predict)")
        if positions.dtype == torch.bool:
            if bool(positions[:, 0].any()):
                raise ValueError("a causal LM cannot predict token 0 (it has no prefix)")
            source = torch.zeros_like(positions)
            source[:, :-1] = positions[:, 1:]
            b, i = source.nonzero(as_tuple=True)
        else:  # [B, K] long: a fixed shape, no sync; a row for token 0 reads position 0 (the caller weights it 0)
            b = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions).reshape(-1)
            i = (positions.reshape(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = dict(use_cache=False)
        if attention_mask is not None:
            kwargs.update(attention_mask=self._causal_mask(attention_mask),
                          position_ids=position_ids_from_mask(attention_mask))
        if self.splittable:
            h = self.hf_model.model(input_ids=input_ids, **kwargs).last_hidden_state
            return self.head()(h[b, i])
        return self.model(input_ids=input_ids, **kwargs).logits[b, i]

    def _causal_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask`` [B, L], or under ``static_attention_mask`` with SDPA the causal mask, ready:
        [B, 1, L, L] bool, True where query i may attend key j (j <= i and j a real token). Each query also
        sees itself, so that a padding query never has every key masked (SDPA would give it NaN); real
        tokens attend exactly as with transformers' own mask."""
        if not self.static_attention_mask or getattr(self.config, "_attn_implementation", None) != "sdpa":
            return attention_mask
        n = attention_mask.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
        itself = torch.eye(n, dtype=torch.bool, device=attention_mask.device)
        return ((causal & attention_mask.bool()[:, None, None, :]) | itself)

    @torch.no_grad()
    def generate_responses(self, prompt_ids: Sequence[Sequence[int]], config: GenerationConfig) -> torch.Tensor:
        """Sample ``config.gen_length`` tokens after each prompt with transformers ``generate``: greedy at
        ``temperature == 0``, else from ``softmax(logits / temperature)`` over the whole vocabulary (no
        top-k / top-p, as the paper's LLM evaluation at temperature 1.0). Draws from the global torch
        RNG (seed it). Returns [B, gen_length], filled with EOS after a sequence stops."""
        from transformers import GenerationConfig as HFGenerationConfig

        eos = self.eos_id if self.eos_id is not None else self.config.eos_token_id
        pad = self.pad_id if self.pad_id is not None else eos
        ids, mask = left_pad(prompt_ids, pad, self.device)
        sample = config.temperature > 0
        hf_cfg = HFGenerationConfig(max_new_tokens=config.gen_length, do_sample=sample, pad_token_id=pad,
                                    eos_token_id=eos, **(dict(temperature=config.temperature, top_k=0, top_p=1.0)
                                                         if sample else {}))
        was_training = self.training
        self.eval()
        try:
            out = self.hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_cfg)
        finally:
            self.train(was_training)
        responses = out[:, ids.shape[1]:]
        fill = torch.full((ids.shape[0], config.gen_length - responses.shape[1]), eos, dtype=responses.dtype,
                          device=responses.device)
        return torch.cat([responses, fill], dim=1)

    def save_pretrained(self, path: str | Path, tokenizer=None, *, merge_lora: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Export a loadable transformers folder (safetensors); LoRA merged unless ``merge_lora=False``."""
        export_model(self.model, path, tokenizer, merge_lora=merge_lora, state_dict=state_dict)


def load_causal_lm(cfg: ModelConfig, tokenizer=None) -> tuple[CausalLM, Any]:
    """A causal LM from ``cfg``: ``preset:NAME`` builds a new one (``ar_preset_config``; the tokenizer
    must be given or named by ``cfg.tokenizer``), anything else is loaded with
    ``AutoModelForCausalLM`` keeping causal attention. LoRA when ``cfg.lora_r > 0``."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from_adapter = False
    if is_preset(cfg):
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg)
        ensure_pad_token(tokenizer)
        config = ar_preset_config(cfg.name_or_path[len("preset:"):], len(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  max_position_embeddings=cfg.max_position_embeddings, overrides=cfg.preset_overrides)
        config._attn_implementation = cfg.attn_implementation
        model = LlamaForCausalLM(config).to(DTYPES[cfg.dtype])
    else:
        src = cfg.name_or_path
        adapter = Path(src) / "adapter_config.json"
        from_adapter = adapter.exists()
        base = json.loads(adapter.read_text())["base_model_name_or_path"] if from_adapter else src
        kwargs: dict[str, Any] = dict(dtype=DTYPES[cfg.dtype], revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        if not is_autoregressive_config(model.config):
            raise ValueError(f"{src} is not a causal LM (it has is_causal=False or a diffusion mask id): "
                             f"load it as a DLM")
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg, path=src if (Path(src) / "tokenizer_config.json").exists() else None)
        ensure_pad_token(tokenizer)
        if from_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, src, is_trainable=True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0 and not from_adapter:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, cfg)
    return CausalLM(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id), tokenizer


def load_for_inference(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """A ``CausalLM`` for a causal checkpoint, else a ``DiffusionModel`` (``models.loading.build_model``)."""
    from .loading import build_model

    if not is_preset(cfg) and is_autoregressive_checkpoint(cfg.name_or_path, revision=cfg.revision,
                                                           trust_remote_code=cfg.trust_remote_code):
        return load_causal_lm(cfg)
    return build_model(cfg)
