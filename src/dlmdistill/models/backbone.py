"""``DiffusionModel``: one interface over every backbone a DLM can have.

A masked-diffusion LM is any transformer that attends bidirectionally and predicts the token at
each masked position. Backbones differ in three ways that the rest of dlmdistill must not care about:

* the **mask id** (the built-in tokenizers' ``<|mdm_mask|>``, 126336 for LLaDA, 151666 for Dream, ...);
* the **logit shift**: Dream-style models predict token ``i`` from position ``i - 1``;
* whether the model splits into a **body** (hidden states after the final norm) and a **head**
  (the LM-head linear layer). When it does (Llama, Qwen2/3, Mistral, ... including LoRA-wrapped
  ones) the head is applied only at the positions a loss needs, which at a 32k-150k vocabulary is
  most of the memory of a training step. Other models (masked LMs with a transform head,
  remote-code models) fall back to full logits followed by a gather: correct, just not as lean.

``DiffusionModel`` is an ``nn.Module`` that owns the Hugging Face model (possibly a ``PeftModel``)
so that Accelerate can wrap *it* in DDP/FSDP/DeepSpeed: every submodule is then called inside the
wrapped forward. Training methods may attach auxiliary modules (SelfFusion's calibration RMSNorm)
through ``add_calibration``; they are trained and checkpointed with the run but never exported.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

#: decoder families whose ``XForCausalLM.forward`` is exactly ``lm_head(model(...).last_hidden_state)``
SPLITTABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3", "starcoder2"}


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnable scale (weight initialised to 1)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. [B, L] -> [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DiffusionModel(nn.Module):
    """A bidirectional transformer used as a masked-diffusion LM.

    Args:
        model: a transformers model (``XForCausalLM`` with ``is_causal=False``, a masked LM, or a
            ``PeftModel`` around one of them).
        mask_id: the mask token id.
        shift_logits: True for Dream-style models (token ``i`` predicted at position ``i - 1``).
        pad_id, eos_id: special ids used by the sampler and the data pipeline.
    """

    def __init__(self, model: nn.Module, mask_id: int, *, shift_logits: bool = False,
                 pad_id: int | None = None, eos_id: int | None = None):
        super().__init__()
        self.model = model
        self.mask_id = int(mask_id)
        self.shift_logits = bool(shift_logits)
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.calibration: RMSNorm | None = None
        #: pass SDPA a ready [B, 1, L, L] mask instead of the [B, L] padding mask, so transformers does not
        #: read the mask back to see whether it can drop it (a device-to-host sync per forward; set by the
        #: trainer under ``training.static_shapes``)
        self.static_attention_mask = False
        hf = self.hf_model
        self._takes_position_ids = "position_ids" in inspect.signature(hf.forward).parameters
        self.splittable = getattr(hf.config, "model_type", None) in SPLITTABLE_MODEL_TYPES and \
            hf.get_output_embeddings() is not None and hasattr(hf, "model")

    # ------------------------------------------------------------------ structure
    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model (inside a ``PeftModel`` if LoRA is on)."""
        return self.model.get_base_model() if _is_peft(self.model) else self.model

    @property
    def config(self):
        return self.hf_model.config

    @property
    def is_peft(self) -> bool:
        return _is_peft(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.get_output_embeddings().weight.shape[0]) if self.splittable else int(self.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def head(self) -> nn.Module:
        """The LM head (a linear layer hidden -> vocab)."""
        return self.hf_model.get_output_embeddings()

    def add_calibration(self, eps: float = 1e-6) -> RMSNorm:
        """Attach SelfFusion's easy-mode calibration RMSNorm (weight of size hidden)."""
        if not self.splittable:
            raise ValueError(
                f"calibration needs a backbone split into body and head; {self.config.model_type!r} is not "
                f"(supported: {', '.join(sorted(SPLITTABLE_MODEL_TYPES))})")
        self.calibration = RMSNorm(self.hidden_size, eps=eps).to(self.device)
        return self.calibration

    # ------------------------------------------------------------------ forward
    def _select(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch and sequence indices of the hidden states that predict ``positions``: a [B, L] bool mask
        (its True entries in row-major order: a data-dependent count, so one device-to-host sync), a
        [B, K] long tensor of positions per row (every entry, row-major: a fixed shape, no sync), or a
        (rows, positions) pair of [N] long tensors (those entries, no sync)."""
        if isinstance(positions, tuple):  # (row, position) index pairs, taken as they are
            b, i = positions
            if self.shift_logits:
                torch._assert_async((i > 0).all(), "a shifted-logit model cannot predict position 0")
        elif positions.dtype == torch.bool:
            b, i = positions.nonzero(as_tuple=True)
            if self.shift_logits and bool((i == 0).any()):
                raise ValueError("a shifted-logit model cannot predict position 0 (it has no left neighbour)")
        else:
            b = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions).reshape(-1)
            i = positions.reshape(-1)
            if self.shift_logits:  # checked on the device, without waiting for it
                torch._assert_async((i > 0).all(), "a shifted-logit model cannot predict position 0")
        return b, (i - 1 if self.shift_logits else i)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after the model's own final norm, [B, L, H]. Needs a splittable backbone."""
        kwargs = {}
        if attention_mask is not None:
            kwargs = dict(attention_mask=self._padding_mask(attention_mask, input_ids.shape[1]),
                          position_ids=position_ids_from_mask(attention_mask))
        return self.hf_model.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state

    def _padding_mask(self, attention_mask: torch.Tensor, length: int) -> torch.Tensor:
        """``attention_mask`` [B, K] over the keys, or under ``static_attention_mask`` with SDPA the same mask
        as transformers builds it for a bidirectional model: [B, 1, length, K] bool for ``length`` queries,
        True where a key is real (with a cache, K counts the cached keys too)."""
        if not self.static_attention_mask or getattr(self.hf_model.config, "_attn_implementation", None) != "sdpa":
            return attention_mask
        return attention_mask.bool()[:, None, None, :].expand(-1, 1, length, -1)

    def cached_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of ``input_ids`` [B, L] attending to the keys already in ``cache`` (a
        transformers ``Cache``) and to each other; their keys and values are appended to ``cache``.

        ``attention_mask`` [B, C + L] covers the C cached keys, in the order the cache holds them,
        then ``input_ids``; ``position_ids`` [B, L] are the true positions of ``input_ids`` (the
        rotary embeddings of the cached keys were applied when they were computed). The backbone
        must attend bidirectionally (``is_causal=False``): transformers then builds a padding-only
        mask over all C + L keys."""
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
            else:
                position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1]:]
        if attention_mask is None:
            attention_mask = torch.ones((input_ids.shape[0], cache.get_seq_length() + input_ids.shape[1]),
                                        dtype=torch.long, device=input_ids.device)
        body = self.hf_model.model
        name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        out = body(input_ids=input_ids, attention_mask=self._padding_mask(attention_mask, input_ids.shape[1]),
                   position_ids=position_ids, use_cache=True, **{name: cache})
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, calibrate: torch.Tensor | None = None, *,
                cache=None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the masked-diffusion model.

        input_ids:      [B, L].
        attention_mask: [B, L] (1 = real token, 0 = padding) or None; with ``cache``, [B, C + L]
                        over the cached keys (in the cache's order) and then ``input_ids``.
        positions:      None -> logits at every position, [B, L, V] (aligned so that ``logits[:, i]``
                        predicts token ``i`` even for shifted models);
                        [B, L] bool -> logits only where True, [N, V] in row-major order;
                        [B, K] long -> logits at these positions of each row, [B * K, V] (fixed shape);
                        (rows, positions), two [N] long tensors -> logits at those entries, [N, V].
        calibrate:      [B] bool: apply the calibration RMSNorm to these sequences' hidden states.
        cache:          a transformers ``Cache`` (e.g. ``DynamicCache``): ``input_ids`` attend to its
                        keys as well as to each other, and their keys and values are appended to it
                        (the sampler's key/value caching; see ``cached_hidden_states``).
        position_ids:   [B, L] true positions of ``input_ids`` (needed with ``cache``; default:
                        counted over the real tokens of ``attention_mask``).
        """
        if cache is not None:
            if not self.splittable:
                raise ValueError(f"key/value caching needs a backbone split into body and head; "
                                 f"{self.config.model_type!r} is not (supported: {', '.join(sorted(SPLITTABLE_MODEL_TYPES))})")
            h = self.cached_hidden_states(input_ids, attention_mask, cache, position_ids)
        elif self.splittable:
            h = self.hidden_states(input_ids, attention_mask)
        if self.splittable:
            if positions is None:
                if self.shift_logits:
                    h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
                rows = calibrate
                if rows is not None:
                    h = torch.where(rows[:, None, None], self._calibrate(h), h)
                return self.head()(h)
            b, i = self._select(positions)
            h = h[b, i]
            if calibrate is not None:
                h = torch.where(calibrate[b][:, None], self._calibrate(h), h)
            return self.head()(h)
        if calibrate is not None:
            raise ValueError("calibration needs a splittable backbone")
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self._takes_position_ids:  # remote-code models (LLaDA) may not
                kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        logits = self.model(input_ids=input_ids, **kwargs).logits
        if positions is None:
            return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if self.shift_logits else logits
        b, i = self._select(positions)
        return logits[b, i]

    def _calibrate(self, h: torch.Tensor) -> torch.Tensor:
        if self.calibration is None:
            raise ValueError("calibrate was requested but no calibration module is attached (add_calibration)")
        return self.calibration(h)

    # ------------------------------------------------------------------ adapters (LoRA)
    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model without LoRA adapters (the frozen initial policy); no-op without LoRA."""
        ctx = self.model.disable_adapter() if self.is_peft else nullcontext()
        with ctx:
            yield

    # ------------------------------------------------------------------ export
    def save_pretrained(self, path: str | Path, tokenizer=None, *, merge_lora: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Export a loadable model folder (transformers format, safetensors) with the DLM fields
        ``mask_token_id`` and ``dlm_shift_logits`` in its config; see ``export_model``. The
        calibration module is not part of ``self.model`` and so is never exported."""
        export_model(self.model, path, tokenizer, merge_lora=merge_lora, state_dict=state_dict,
                     config_updates={"mask_token_id": self.mask_id, "dlm_shift_logits": self.shift_logits})


def export_model(model: nn.Module, path: str | Path, tokenizer=None, *, merge_lora: bool = True,
                 state_dict: dict[str, torch.Tensor] | None = None, config_updates: dict | None = None) -> None:
    """Write ``model`` (a transformers model or a ``PeftModel``) and ``tokenizer`` to ``path``.

    With LoRA, ``merge_lora=True`` writes a merged full model (from a copy; the live model keeps its
    adapters), else the adapter alone, its base recorded in adapter_config.json. ``state_dict`` is a
    full state dict gathered by Accelerate under FSDP/DeepSpeed, keyed by the wrapper's names
    (``model.`` + the transformers names).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if _is_peft(model) and merge_lora:
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    elif state_dict is not None and not _is_peft(model):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    config = (model.get_base_model() if _is_peft(model) else model).config
    for key, value in (config_updates or {}).items():
        setattr(config, key, value)
    model.save_pretrained(str(path), state_dict=None if _is_peft(model) else state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, P], attention_mask [B, P])``."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, x in enumerate(prompts):
        if len(x):
            ids[i, p - len(x):] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, p - len(x):] = 1
    return ids.to(device), mask.to(device)


def context_limit(model: nn.Module) -> int | None:
    """The number of positions the model can attend over (``max_position_embeddings``), if it has one."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
