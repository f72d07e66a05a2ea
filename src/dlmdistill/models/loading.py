"""Build or load a ``DiffusionModel`` and its tokenizer from a ``ModelConfig``.

Sources, by ``ModelConfig.name_or_path``:

* ``preset:NAME`` - a new, randomly initialised built-in backbone (see ``presets.PRESETS``); its
  tokenizer comes from ``ModelConfig.tokenizer`` (a path/id) or is built from the training texts
  (``char`` / ``bpe:N``) by the caller and passed in;
* a dlmdistill/transformers DLM folder or hub id (``config.mask_token_id`` set, ``is_causal=False``);
* any transformers **decoder** (Llama, Qwen2/3, Mistral, SmolLM, ...): made bidirectional
  (``is_causal=False``), given a mask token (added and embeddings resized if needed): this is the
  AR-to-DLM adaptation; ``shift_logits=true`` keeps the AR alignment like Dream does;
* a **masked LM** (BERT, RoBERTa, ModernBERT, ...): already bidirectional, uses its own mask token;
* LLaDA and Dream remote code, only with ``trust_remote_code=true`` (on transformers 5 prefer
  ``dlmdistill convert llada|dream``, which gives native classes);
* a GGUF file inside a folder or hub repo (``gguf_file=``), e.g. SmolLM2-135M-Instruct.

LoRA (peft) is applied when ``lora_r > 0``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..configs.model import ModelConfig
from ..errors import UserError
from .backbone import DiffusionModel
from .presets import preset_config
from .tokenizer import TOKENIZER_FILES, ensure_mask_token, ensure_pad_token, tokenizer_files

log = logging.getLogger(__name__)

#: remote-code model types and their known mask ids / logit shift
REMOTE_CODE_FAMILIES = {"llada": dict(mask_id=126336, shift=False), "dream": dict(mask_id=151666, shift=True)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_preset(cfg: ModelConfig) -> bool:
    return cfg.name_or_path.startswith("preset:")


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer named by ``cfg.tokenizer`` (or at ``path`` / the model path)."""
    from transformers import AutoTokenizer

    src = path or cfg.tokenizer or cfg.name_or_path
    kwargs: dict[str, Any] = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.gguf_file and src == cfg.name_or_path:
        kwargs["gguf_file"] = cfg.gguf_file
    return AutoTokenizer.from_pretrained(src, **kwargs)


def apply_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    targets: Any = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none")
    return get_peft_model(model, lora)


def build_model(cfg: ModelConfig, tokenizer=None) -> tuple[DiffusionModel, Any]:
    """Create or load the model described by ``cfg``; returns ``(DiffusionModel, tokenizer)``."""
    if is_preset(cfg):
        if tokenizer is None:
            if cfg.tokenizer is None or cfg.tokenizer == "char" or cfg.tokenizer.startswith("bpe:"):
                raise UserError(f"{cfg.name_or_path} is a new, untrained model and needs a tokenizer: set "
                                f"model.tokenizer to a tokenizer folder or hub id (char and bpe:N are built from "
                                f"the data, in training only); to sample from a trained model, give its run folder")
            tokenizer = load_tokenizer(cfg)
        mask_id, _ = ensure_mask_token(tokenizer, cfg.mask_token)
        ensure_pad_token(tokenizer)
        config = preset_config(cfg.name_or_path[7:], len(tokenizer), mask_token_id=mask_id,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, max_position_embeddings=cfg.max_position_embeddings,
                               overrides=cfg.preset_overrides)
        config._attn_implementation = cfg.attn_implementation
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config).to(DTYPES[cfg.dtype])
        return _finish(model, tokenizer, cfg, mask_id=mask_id, shift=False)
    return load_pretrained(cfg, tokenizer)


def _lora_base(path: Path) -> str | None:
    import json

    f = path / "adapter_config.json"
    return json.loads(f.read_text()).get("base_model_name_or_path") if f.exists() else None


def check_model_source(src: str, gguf_file: str | None = None) -> None:
    """Fail early, naming ``src``, when a local model path cannot be a model: a missing path that is
    clearly local (``/``, ``./``, ``../``, ``~`` or more than one ``/``: a hub id is ``name`` or
    ``owner/name``), a file, or a folder without ``config.json`` (or a LoRA ``adapter_config.json``,
    or a GGUF file)."""
    if not src.strip():
        raise UserError("no model given (model.name_or_path or the teacher is empty)")
    path = Path(src).expanduser()
    if path.is_dir():
        if (gguf_file or (path / "config.json").exists() or (path / "adapter_config.json").exists()
                or any(path.glob("*.gguf"))):
            return
        hint = ""
        if (path / "checkpoints").is_dir() or (path / "run.json").exists():
            hint = "; it is a run folder without a final/ model (training did not finish): continue it with --resume"
        raise UserError(f"{src}: not a model folder (no config.json){hint}")
    if path.exists():
        raise UserError(f"{src}: is a file; give the model folder (a run folder, its final/ export or a saved model)")
    if src.startswith(("/", "./", "../", "~")) or "\\" in src or src.count("/") > 1:
        raise UserError(f"{src}: no such model folder")


def load_pretrained(cfg: ModelConfig, tokenizer=None) -> tuple[DiffusionModel, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    src = cfg.name_or_path
    local = Path(src)
    adapter_base = _lora_base(local) if local.is_dir() else None
    common: dict[str, Any] = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.gguf_file:
        common["gguf_file"] = cfg.gguf_file
    model_src = adapter_base or src
    check_model_source(src, cfg.gguf_file)
    try:
        config = AutoConfig.from_pretrained(model_src, **common)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not cfg.trust_remote_code:
            raise UserError(f"{model_src}: this checkpoint ships its own modeling code. Either convert it to native "
                            f"classes ('dlmdistill convert llada|dream SRC DST', recommended) or set "
                            f"model.trust_remote_code=true if you trust it") from None
        raise UserError(f"{model_src}: not a model transformers can load ({e})") from None
    except OSError as e:
        if Path(model_src).expanduser().exists():
            raise
        raise UserError(f"{model_src}: no such local folder, and loading it as a Hugging Face Hub id failed: "
                        f"{e}") from None
    model_type = getattr(config, "model_type", "")
    family = REMOTE_CODE_FAMILIES.get(model_type)
    if tokenizer is None:
        tokenizer_src = src if (local / "tokenizer_config.json").exists() else (cfg.tokenizer or model_src)
        if not (cfg.gguf_file and tokenizer_src == cfg.name_or_path):  # a GGUF file carries its own tokenizer
            _require_tokenizer_files(tokenizer_src, src)
        tokenizer = load_tokenizer(cfg, path=tokenizer_src)
    kwargs: dict[str, Any] = dict(common, dtype=DTYPES[cfg.dtype])
    if cfg.gguf_file:  # trainable dense weights, not packed GGUF blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=cfg.gguf_file, dequantize=True)
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(cfg)
    if cfg.attn_implementation and family is None:
        kwargs["attn_implementation"] = cfg.attn_implementation

    is_mlm = any(a.endswith("ForMaskedLM") for a in (getattr(config, "architectures", None) or []))
    if family is not None:
        log.warning("%s: loading remote code; its attention ignores padding masks on some versions. "
                    "'dlmdistill convert %s' gives a native, mask-respecting model.", model_src, model_type)
        model = AutoModelForCausalLM.from_pretrained(model_src, **kwargs) if model_type == "dream" else \
            _load_remote_llada(model_src, kwargs)
        mask_id = getattr(config, "mask_token_id", None) or family["mask_id"]
        shift = family["shift"] if cfg.shift_logits is None else cfg.shift_logits
    elif is_mlm:
        model = AutoModelForMaskedLM.from_pretrained(model_src, **kwargs)
        if tokenizer.mask_token is None:
            raise ValueError(f"{model_src}: masked LM without a mask token in its tokenizer")
        mask_id, shift = tokenizer.mask_token_id, False
    else:
        config.is_causal = False
        model = AutoModelForCausalLM.from_pretrained(model_src, config=config, **kwargs)
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None or cfg.mask_token is not None:
            mask_id, added = ensure_mask_token(tokenizer, cfg.mask_token)
            if mask_id >= model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
                log.info("added mask token %r (id %d) and resized embeddings to %d", tokenizer.mask_token, mask_id,
                         len(tokenizer))
        elif tokenizer.mask_token is None:
            mask_token = tokenizer.convert_ids_to_tokens(int(mask_id))
            if mask_token is None:
                raise ValueError(f"{src}: the checkpoint's mask token id {mask_id} is not in its tokenizer "
                                 f"({len(tokenizer)} tokens): the tokenizer does not belong to this model. "
                                 + _TOKENIZER_HINT.format(folder=src))
            tokenizer.add_special_tokens({"mask_token": mask_token})
        shift = bool(getattr(config, "dlm_shift_logits", False)) if cfg.shift_logits is None else cfg.shift_logits
        model.config.is_causal = False
    ensure_pad_token(tokenizer)
    if cfg.gguf_file:
        _drop_dequantized_quantizer(model)
    if adapter_base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, src, is_trainable=True)
        return _finish(model, tokenizer, cfg, mask_id=mask_id, shift=shift, lora=False)
    return _finish(model, tokenizer, cfg, mask_id=mask_id, shift=shift)


_TOKENIZER_HINT = ("Copy the tokenizer files of the original checkpoint (tokenizer.json, tokenizer_config.json, "
                   "special_tokens_map.json, ...) into {folder}, or name a tokenizer: load_model(PATH, "
                   "tokenizer='FOLDER_OR_HUB_ID'), 'model.tokenizer' in a config, --model.tokenizer on the command "
                   "line. ('dlmdistill convert' copies the tokenizer when the source folder has one.)")


def _require_tokenizer_files(tokenizer_src: str, model_src: str) -> None:
    """A local folder to load a tokenizer from must hold tokenizer files; say so and how to add them."""

    folder = Path(tokenizer_src)
    if folder.is_dir() and not tokenizer_files(folder):
        where = f"{folder}" if str(folder) == str(model_src) else f"{folder} (the tokenizer for {model_src})"
        raise ValueError(f"{where}: the tokenizer is missing: none of its files ({', '.join(TOKENIZER_FILES)}) "
                         f"is in this folder. " + _TOKENIZER_HINT.format(folder=folder))


def _drop_dequantized_quantizer(model) -> None:
    """A GGUF checkpoint loaded with ``dequantize=True`` is a plain dense model, but transformers still
    marks it as quantized and refuses to save it; forget the (spent) quantizer."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "dequantize", False):
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _load_remote_llada(src: str, kwargs: dict[str, Any]):
    from transformers import AutoModel

    return AutoModel.from_pretrained(src, **kwargs)


def four_bit_config(cfg: ModelConfig):
    """transformers' bitsandbytes config for ``model.load_in_4bit``: NF4 weights, compute in ``model.dtype``."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.load_in_4bit needs the bitsandbytes package: pip install bitsandbytes (it runs on "
                        "NVIDIA GPUs and, more slowly, on CPUs); or set model.load_in_4bit false") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.dtype])


def _finish(model, tokenizer, cfg: ModelConfig, *, mask_id: int, shift: bool, lora: bool = True) -> tuple[DiffusionModel, Any]:
    if getattr(model, "is_loaded_in_4bit", False):  # norms in float32, inputs that carry gradients to the adapters
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora and cfg.lora_r > 0:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, cfg)
    dm = DiffusionModel(model, mask_id, shift_logits=shift, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    return dm, tokenizer


def resolve_device(name: str | None = None) -> torch.device:
    """The torch device ``name`` ("cuda", "cuda:1", "cpu", ...; None: cuda if available, else cpu). A device
    this machine lacks, or a malformed name, is a ``UserError`` that says which."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device {name!r}: {e}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(name_or_path: str, **overrides: Any) -> tuple[DiffusionModel, Any]:
    """Python API: ``model, tok = load_model("runs/sft/final")`` or ``load_model("HuggingFaceTB/SmolLM2-135M")``."""
    return build_model(ModelConfig(name_or_path=name_or_path, **overrides))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
