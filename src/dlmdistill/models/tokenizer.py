"""Tokenizers for models trained from scratch, and mask-token handling for every tokenizer.

* ``char_tokenizer(texts)``: one token per character seen in ``texts`` (generated tasks such as
  Countdown and Sudoku, where a character vocabulary keeps a CPU model tiny);
* ``train_bpe_tokenizer(texts, vocab_size)``: a byte-level BPE trained with the ``tokenizers``
  library (instruction following on a small corpus);
* ``ensure_mask_token(tokenizer)``: give any tokenizer a mask token (AR-to-DLM adaptation).

All of them are ``transformers.PreTrainedTokenizerFast`` objects with ``pad``, ``eos``, ``mask``
and ``unk`` special tokens, so they save and load like any Hugging Face tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, MASK, UNK, BOS = "<|pad|>", "<|eos|>", "<|mdm_mask|>", "<|unk|>", "<|bos|>"
SPECIAL_TOKENS = [PAD, EOS, MASK, UNK, BOS]
DEFAULT_MASK_TOKEN = MASK


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK, unk_token=UNK, bos_token=BOS,
        model_max_length=model_max_length, padding_side="left",
    )
    return fast


def char_tokenizer(texts: Iterable[str], extra_chars: str = "", model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over every character in ``texts`` (plus ``extra_chars``)."""
    chars = set(extra_chars)
    for t in texts:
        chars.update(t)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok, model_max_length)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 4096,
                        min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, model_max_length)


def ensure_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token: str | None = None) -> tuple[int, bool]:
    """Make sure ``tokenizer`` has a mask token; return ``(mask_id, added)``.

    If ``mask_token`` is given it is used (added to the vocabulary when new); otherwise an
    existing ``tokenizer.mask_token`` is kept, or ``<|mdm_mask|>`` is added. When a token was
    added the caller must resize the model's embeddings.
    """
    if mask_token is None and tokenizer.mask_token is not None:
        return tokenizer.mask_token_id, False
    mask_token = mask_token or DEFAULT_MASK_TOKEN
    before = len(tokenizer)
    tokenizer.add_special_tokens({"mask_token": mask_token})
    return tokenizer.convert_tokens_to_ids(mask_token), len(tokenizer) > before


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Use EOS as padding when the tokenizer has no pad token (common for decoder checkpoints)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set one before training")
        tokenizer.pad_token = tokenizer.eos_token


#: the files a tokenizer folder may hold
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files present in ``folder`` (see :data:`TOKENIZER_FILES`)."""
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
