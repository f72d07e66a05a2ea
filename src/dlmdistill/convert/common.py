"""Shared machinery of the checkpoint converters.

A conversion is a pure renaming (sometimes a split or a pad) of source tensors into the parameter
names of a native ``transformers`` class. Every converter follows the same three steps:

1. :func:`validate_mapping` runs the converter's ``remap`` function on *meta* tensors (shapes only,
   no data) and checks the result against the state dict of the target model built on the meta
   device, so a wrong config, a missing tensor or an unknown name fails before anything is written;
2. :func:`write_weights` streams the source one shard at a time (``safetensors.safe_open`` reads
   one tensor at a time from a memory map) and writes one output shard per source shard, so the
   peak memory is about one source shard, never a second copy of the whole model;
3. :func:`save_config` and :func:`save_tokenizer` write ``config.json`` (with ``is_causal=False``,
   ``mask_token_id`` and ``dlm_shift_logits``) and the tokenizer with its mask token registered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..models.tokenizer import TOKENIZER_FILES, tokenizer_files  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

Remap = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
"""Maps one source tensor (name, value) to the target tensors it becomes (often one, may be none)."""


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class ConversionError(ValueError):
    """The source checkpoint cannot be converted exactly; the message says why and names the field."""


def read_json(path: Path) -> dict:
    """Read a JSON object from ``path``; a missing file is a :class:`ConversionError`."""
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def check_destination(src: Path, dst: Path) -> None:
    """Refuse to write into ``src``, into a non-empty folder or over a file (nothing is created)."""
    if dst.resolve() == src.resolve():
        raise ConversionError(f"destination {dst} is the source folder")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a folder")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"destination {dst} exists and is not empty")


@contextlib.contextmanager
def staged_destination(src: Path, dst: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``dst`` to write the converted model into; on success it
    is renamed to ``dst`` (so ``dst`` appears complete or not at all), on any error it is removed and
    ``dst`` is left as it was. Refuses (before creating anything) what :func:`check_destination` refuses."""
    check_destination(src, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        check_destination(src, dst)  # nothing appeared there meanwhile
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def layer_index(name: str, prefix: str) -> tuple[int, str] | None:
    """Split ``'{prefix}{i}.{rest}'`` into ``(i, rest)``; ``None`` when ``name`` has another form."""
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix) :].partition(".")
    return (int(index), rest) if index.isdigit() and rest else None


# --------------------------------------------------------------------------------------------
# reading the source


@dataclass
class Shard:
    """One source file: its tensor names, their shapes and dtypes, and a loader for one tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    load: Callable[[str], torch.Tensor]


def safetensors_shards(folder: Path) -> list[Shard]:
    """The shards of a Hugging Face folder: those listed by ``model.safetensors.index.json``, else
    the single ``model.safetensors``. Only headers are read here; tensors are loaded on demand."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    return [safetensors_file(folder / name) for name in files]


def safetensors_file(path: Path) -> Shard:
    """A :class:`Shard` over one ``.safetensors`` file (header read now, tensors read lazily)."""
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    shapes, dtypes = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            view = f.get_slice(name)
            shapes[name] = tuple(view.get_shape())
            dtype = view.get_dtype()
            if dtype not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            dtypes[name] = _SAFETENSORS_DTYPES[dtype]

    def load(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    return Shard(path, shapes, dtypes, load)


def state_dict_shard(path: Path, state_dict: Mapping[str, torch.Tensor]) -> Shard:
    """A :class:`Shard` over tensors already in memory (or memory-mapped, e.g. ``torch.load(mmap=True)``)."""
    tensors = dict(state_dict)
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ConversionError(f"{path}: entry {name} is not a floating-point tensor")
    return Shard(
        path,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        tensors.__getitem__,
    )


# --------------------------------------------------------------------------------------------
# checking and writing the weights


def expected_parameters(model_cls: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a saved ``model_cls(config)`` holds (tied copies left out).

    The model is built on the meta device, so this costs no memory whatever the model size.
    """
    with torch.device("meta"):
        model = model_cls(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def validate_mapping(shards: list[Shard], remap: Remap, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Run ``remap`` on meta tensors of every source tensor and compare with ``expected``.

    Raises :class:`ConversionError` naming every missing, unexpected, duplicated or mis-shaped
    target tensor. ``remap`` itself raises for source names it does not know.
    """
    produced: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        for name, shape in shard.shapes.items():
            meta = torch.empty(shape, dtype=shard.dtypes[name], device="meta")
            for target, tensor in remap(name, meta).items():
                if target in produced:
                    raise ConversionError(f"target tensor {target} is produced twice (last from {name})")
                produced[target] = tuple(tensor.shape)
    problems = []
    missing = sorted(set(expected) - set(produced))
    unexpected = sorted(set(produced) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short_list(unexpected)}")
    for name in sorted(set(expected) & set(produced)):
        if expected[name] != produced[name]:
            problems.append(f"{name} has shape {produced[name]}, the target model expects {expected[name]}")
    if problems:
        raise ConversionError("checkpoint does not match its config: " + "; ".join(problems))


def write_weights(shards: list[Shard], remap: Remap, dst: Path, dtype: torch.dtype | None) -> None:
    """Convert and write the weights, one output shard per source shard.

    Output files follow the Hugging Face layout: ``model.safetensors`` for a single shard, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. With ``dtype=None``
    every tensor keeps its stored dtype.
    """
    n = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(shards, start=1):
        filename = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        out: dict[str, torch.Tensor] = {}
        for name in shard.shapes:
            for target, tensor in remap(name, shard.load(name)).items():
                out[target] = tensor.to(dtype or tensor.dtype).contiguous()
        save_file(out, str(dst / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, filename))
        total_size += sum(t.numel() * t.element_size() for t in out.values())
        log.info("wrote %s (%d tensors) from %s", filename, len(out), shard.path.name)
        del out
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def storage_dtype(shards: list[Shard], name: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the converted model is stored in: ``dtype`` if given, else that of tensor ``name``."""
    if dtype is not None:
        return dtype
    for shard in shards:
        if name in shard.dtypes:
            return shard.dtypes[name]
    raise ConversionError(f"tensor {name} not found in the checkpoint")


def save_config(config: PretrainedConfig, dst: Path, *, architecture: str, mask_token_id: int,
                shift_logits: bool, dtype: torch.dtype) -> None:
    """Write ``config.json`` with dlmdistill's DLM attributes.

    ``is_causal`` must already be ``False`` on ``config`` (bidirectional attention in transformers 5);
    ``mask_token_id`` and ``dlm_shift_logits`` are added here and serialised with the config.
    """
    if getattr(config, "is_causal", True):
        raise ValueError("a DLM config must have is_causal=False")
    config.architectures = [architecture]
    config.mask_token_id = mask_token_id
    config.dlm_shift_logits = shift_logits
    config.dtype = dtype
    config.save_pretrained(dst)


def check_mask_token_id(mask_token_id: int, vocab_size: int) -> None:
    """The mask token must have an embedding row (and a logit)."""
    if not 0 <= mask_token_id < vocab_size:
        raise ConversionError(f"mask_token_id {mask_token_id} is outside the vocabulary (size {vocab_size})")


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


# --------------------------------------------------------------------------------------------
# tokenizer


def save_tokenizer(src: Path, dst: Path, mask_token_id: int, *, new_mask_token: str = "<|mdm_mask|>",
                   fallback_class: str = "PreTrainedTokenizerFast") -> PreTrainedTokenizerBase | None:
    """Copy the tokenizer of ``src`` to ``dst`` with its mask token registered; ``None`` if ``src`` has none.

    Call it before writing weights or config to ``dst``. The files are copied, then the tokenizer is
    loaded natively (never with remote code) and saved again so that ``tokenizer.mask_token`` /
    ``mask_token_id`` are set in ``dst``:

    * a ``tokenizer_config.json`` that names a remote-code class (``auto_map``, or a
      ``tokenizer_class`` transformers does not know) is rewritten to a native class:
      ``PreTrainedTokenizerFast`` when ``tokenizer.json`` is present, else ``fallback_class``;
    * if ``mask_token_id`` is inside the vocabulary, the token already there becomes the mask token;
      if it is exactly the next free id, ``new_mask_token`` is added as a special token there;
      any other id is a :class:`ConversionError`.
    """
    files = tokenizer_files(src)
    if not files:
        return None
    for file in files:
        shutil.copy2(file, dst / file.name)
    _make_tokenizer_config_native(dst, fallback_class)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    register_mask_token(tokenizer, mask_token_id, new_mask_token)
    tokenizer.save_pretrained(dst)
    return tokenizer


def register_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token_id: int, new_mask_token: str) -> None:
    """Make ``mask_token_id`` the tokenizer's mask token (see :func:`save_tokenizer`)."""
    size = len(tokenizer)
    if mask_token_id < size:
        token = tokenizer.convert_ids_to_tokens(mask_token_id)
    elif mask_token_id == size:
        token = new_mask_token
    else:
        raise ConversionError(
            f"mask_token_id {mask_token_id} is beyond the tokenizer's vocabulary ({size} tokens)"
        )
    tokenizer.add_special_tokens({"mask_token": token})
    if tokenizer.mask_token_id != mask_token_id:
        raise ConversionError(
            f"could not register the mask token: {token!r} has id {tokenizer.mask_token_id}, "
            f"expected {mask_token_id}"
        )


def _make_tokenizer_config_native(folder: Path, fallback_class: str) -> None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = read_json(path)
    declared = config.get("tokenizer_class")
    remote = "auto_map" in config or (declared is not None and not hasattr(transformers, declared))
    if not remote:
        return
    config.pop("auto_map", None)
    config["tokenizer_class"] = (
        "PreTrainedTokenizerFast" if (folder / "tokenizer.json").is_file() else fallback_class
    )
    log.info("tokenizer class %s replaced by native %s", declared, config["tokenizer_class"])
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_folder(src: Path, dst: Path, *, config: PretrainedConfig, model_class: type[PreTrainedModel], mask_id: int,
                   remap: Remap, embedding_name: str, shift_logits: bool, dtype: torch.dtype | None = None,
                   **tokenizer_kwargs: Any) -> Path:
    """The conversion of a checkpoint folder (``config.json``, safetensors, tokenizer files) whose config was
    already mapped to ``config``, a native ``model_class`` configuration; the converters of LLaDA and Dream
    differ only in that mapping, the parameter names (``remap``) and their tokenizers.

    Everything is checked before anything is written (the mask id, every source tensor against the native
    parameters); then, into a staged destination renamed at the end, the tokenizer with its mask token
    (``save_tokenizer(..., **tokenizer_kwargs)``; a warning when ``src`` has none), the weights streamed one
    shard at a time (in ``dtype``, default the stored one, read from ``embedding_name``), and the config.
    Returns ``dst``."""
    check_mask_token_id(mask_id, config.vocab_size)
    shards = safetensors_shards(src)
    validate_mapping(shards, remap, expected_parameters(model_class, config))
    out_dtype = storage_dtype(shards, embedding_name, dtype)
    with staged_destination(src, dst) as out:
        if save_tokenizer(src, out, mask_id, **tokenizer_kwargs) is None:
            log.warning("no tokenizer files in %s; %s has weights and config only", src, dst)
        write_weights(shards, remap, out, dtype)
        save_config(config, out, architecture=model_class.__name__, mask_token_id=mask_id,
                    shift_logits=shift_logits, dtype=out_dtype)
    return dst
