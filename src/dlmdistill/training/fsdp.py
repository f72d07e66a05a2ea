"""FSDP2 (``torch.distributed.fsdp.fully_shard``) driven by dlmdistill itself, for multi-process CPU runs.

Accelerate 1.x turns ``ACCELERATE_USE_FSDP`` into an FSDP setup only for accelerator devices (its
``AcceleratorState`` leaves a CPU/gloo launch as ``MULTI_CPU``, and ``accelerate launch --cpu``
ignores ``--use_fsdp``). PyTorch's FSDP2 itself runs on CPU with gloo, so when a multi-process CPU
launch asks for FSDP (``ACCELERATE_USE_FSDP=true``, the variable Accelerate's launcher sets) the
trainer shards the model here and keeps Accelerate for everything else (process group, data
sharding, autocast, trackers). On GPUs Accelerate's own FSDP path is used unchanged.

What this module provides, each a collective (every rank must call it, in the same order):

* ``shard``: one FSDP unit per decoder layer (the transformers model's ``_no_split_modules``, or
  the class names in ``FSDP_TRANSFORMER_CLS_TO_WRAP``), then the whole ``DiffusionModel`` as the
  root unit (embeddings, final norm, LM head, SelfFusion's calibration);
* ``clip_grad_norm_``: the global gradient norm over DTensor gradients (a plain float on every
  rank) and clipping of the local shards;
* ``nonfinite_parameters``: the names of parameters with a NaN/inf on any rank;
* ``full_model_state_dict`` / ``full_optimizer_state_dict``: full (unsharded) state on rank 0, in
  the same layout a single process writes, so checkpoints and exports look the same whatever the
  engine; ``load_model_state_dict`` / ``load_optimizer_state_dict`` shard full state back.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)


def requested() -> bool:
    """True when the launch asks for FSDP (``ACCELERATE_USE_FSDP=true``, as ``accelerate launch`` with an
    FSDP config sets it, or set by hand in front of ``torchrun``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def check_version() -> None:
    version = os.environ.get("FSDP_VERSION", "2").strip()
    if version != "2":
        raise UserError(f"FSDP_VERSION={version}: multi-process CPU runs support FSDP2 only (fully_shard); "
                        "set fsdp_version: 2 in the Accelerate config (or FSDP_VERSION=2)")


def layer_classes(model: nn.Module) -> set[str]:
    """Names of the module classes that become their own FSDP unit."""
    env = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    if env:
        return {c.strip() for c in env.split(",") if c.strip()}
    hf = getattr(model, "hf_model", model)
    return set(getattr(hf, "_no_split_modules", None) or ())


def shard(model: nn.Module, *, mixed_precision: str = "no", reshard_after_forward: bool | None = None) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` (in place).

    ``mixed_precision: bf16`` becomes FSDP2's own policy (as Accelerate sets it for FSDP2): parameters
    all-gathered and computed in bfloat16, gradients reduced in float32, the sharded parameters and the
    optimizer state kept in float32. fp16 would need a gradient scaler for sharded gradients and is refused."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if getattr(model, "is_peft", False):
        raise UserError("LoRA (model.lora_r > 0) is not supported with FSDP on CPU yet: train LoRA with DDP "
                        "(configs/accelerate/multi_cpu.yaml or plain torchrun), or full fine-tuning with FSDP")
    if reshard_after_forward is None:
        reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() != "false"
    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"FSDP: no module of the classes {sorted(names) or '(none)'} in the model "
                        f"({type(getattr(model, 'hf_model', model)).__name__}); set FSDP_TRANSFORMER_CLS_TO_WRAP "
                        "(fsdp_transformer_layer_cls_to_wrap) to its decoder layer class")
    if mixed_precision == "fp16":
        raise UserError("mixed_precision fp16 is not supported with FSDP on CPU: use bf16 or no")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    kinds = "/".join(sorted({type(m).__name__ for m in layers}))
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    log.info("FSDP2 (fully_shard, run by dlmdistill): %d %s units + the root, mixed_precision %s", len(layers), kinds,
             mixed_precision)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients (DTensor shards reduced over ranks), then every gradient scaled
    by ``min(1, max_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does. Returns the norm
    before clipping (the same float on every rank); a non-finite norm leaves the gradients unchanged."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for g in grads:
        sq = _local(g).detach().double().pow(2).sum()
        if isinstance(g, DTensor):
            sharded += sq
        else:
            replicated += sq
    if dist.is_initialized():
        dist.all_reduce(sharded)
    norm = math.sqrt(float(sharded + replicated))
    if math.isfinite(norm) and max_norm < float("inf"):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            with torch.no_grad():
                for g in grads:
                    _local(g).mul_(coef)
    return norm


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters that hold a NaN or infinity on any rank (the same list on every rank)."""
    import torch.distributed as dist

    named = list(model.named_parameters())
    flags = torch.tensor([0 if bool(torch.isfinite(_local(p).detach()).all()) else 1 for _, p in named],
                         dtype=torch.int32)
    if dist.is_initialized() and flags.numel():
        dist.all_reduce(flags)
    return [n for (n, _), f in zip(named, flags.tolist()) if f]


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state_dict(model: nn.Module, keep: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (CPU tensors), the parameters of ``keep`` only when given; ``{}``
    on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    if keep is not None:
        sd = {k: v for k, v in sd.items() if k in keep}
    return {k: v.detach().contiguous() for k, v in sd.items()}


def load_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Shard the full ``state_dict`` (present on every rank) into ``model``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state_dict, options=_options(full_state_dict=True, strict=strict))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of every optimizer slot, in the order of ``optimizer.state_dict()``'s indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full tensors, laid out as ``optimizer.state_dict()`` of an unsharded run
    (state keyed by slot index), on rank 0; ``{}`` on the other ranks."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    state = {index[fqn]: {k: (v.detach().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for fqn, s in osd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[f] for f in g["params"]]}
              for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Shard a full, index-keyed optimizer state (present on every rank) into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    state = {names[int(i)]: s for i, s in state_dict["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[int(i)] for i in g["params"]]}
              for g in state_dict["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=_options(full_state_dict=True))
