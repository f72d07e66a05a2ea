"""``convert ar``: adapt a transformers decoder (hub id or folder) into a bidirectional DLM folder."""

from __future__ import annotations

from pathlib import Path

from .common import check_destination, staged_destination


def convert_ar(src: str, dst: str | Path, *, dtype: str | None = None, mask_token: str | None = None,
               shift_logits: bool = False, gguf_file: str | None = None, revision: str | None = None,
               trust_remote_code: bool = False):
    """Load the decoder ``src`` as a DLM (bidirectional attention, a mask token) and save it to ``dst``.

    ``dst`` is checked first (must be absent or an empty folder, not ``src``), then ``src`` is loaded,
    and only then is anything written: into a temporary folder renamed to ``dst`` at the end, so a
    missing or broken source leaves no trace. Returns ``(model, tokenizer)``."""
    from ..models.loading import ModelConfig, build_model

    dst = Path(dst)
    check_destination(Path(src), dst)
    model, tok = build_model(ModelConfig(name_or_path=src, gguf_file=gguf_file, revision=revision,
                                         dtype=dtype or "float32", trust_remote_code=trust_remote_code,
                                         mask_token=mask_token, shift_logits=True if shift_logits else None))
    with staged_destination(Path(src), dst) as out:
        model.save_pretrained(out, tok)
    return model, tok
