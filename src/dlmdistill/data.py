"""From task examples to training batches.

``DataConfig`` names the task and its sources; ``load_examples`` turns it into ``Example`` lists;
``tokenize_examples`` turns examples into prompt/response token ids (response = target + EOS);
``DiffusionCollator`` lays a batch out as::

    [prompt][response][EOS padding ... ][pad ...]
     mask 1   mask 1    mask 1, trained   mask 0

EOS padding is trained (LLaDA/SMDM do this): at inference the response length is fixed, and the
model must learn to fill the tail with EOS. ``response_mask`` marks the positions the forward
process may mask (response + EOS padding); ``prompt_mask`` marks real prompt tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from .configs.data import LONG_EXAMPLES, DataConfig
from .tasks.base import Example
from .tasks.io import DataError

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "DiffusionCollator", "load_examples", "tokenize_examples", "format_prompt",
           "render_messages", "LONG_EXAMPLES"]


def load_examples(cfg: DataConfig, split: Literal["train", "eval"]) -> list[Example]:
    """The task's examples for the training or the evaluation split of ``cfg``."""
    from .tasks.registry import get_task

    task = get_task(cfg.task, **cfg.task_kwargs)
    if split == "train":
        source, examples = cfg.train_source, task.load(cfg.train_source, split=cfg.train_split,
                                                       limit=cfg.train_limit, seed=cfg.seed)
    else:
        source, examples = cfg.eval_source, task.load(cfg.eval_source, split=cfg.eval_split,
                                                      limit=cfg.eval_limit, seed=cfg.seed)
    if not examples:
        raise DataError(f"{source or f'the {task.name} task'}: no {'training' if split == 'train' else 'evaluation'} "
                        f"examples (split {cfg.train_split if split == 'train' else cfg.eval_split!r})")
    return examples


def render_messages(tokenizer, messages: list[dict[str, str]]) -> str:
    """``messages`` through the tokenizer's chat template with the generation prompt (the assistant turn
    opened); a tokenizer without one gets :data:`~dlmdistill.tasks.chat.DEFAULT_CHAT_TEMPLATE`."""
    from .tasks.chat import render_default

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return render_default(messages)


def format_prompt(tokenizer, prompt: str | Example, fmt: str = "plain") -> str:
    """The prompt text as the model sees it. An :class:`Example` with chat ``messages`` (conversational
    data) always goes through the chat template; a text prompt does with ``fmt="chat"`` (as one user
    message). Where the tokenizer has no chat template the default template of
    :mod:`dlmdistill.tasks.chat` is used."""
    if isinstance(prompt, Example):
        if prompt.messages is not None:
            return render_messages(tokenizer, prompt.messages)
        prompt = prompt.prompt
    if fmt == "chat":
        return render_messages(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


def encode_prompt(tokenizer, prompt: str | Example, fmt: str = "plain") -> list[int]:
    """Token ids of the formatted prompt (no special tokens added)."""
    return tokenizer(format_prompt(tokenizer, prompt, fmt), add_special_tokens=False).input_ids


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_length: int, prompt_format: str = "plain",
                      require_target: bool = True, max_prompt_length: int | None = None,
                      long_examples: str = "error", stats: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Token ids for each example: ``{"prompt_ids", "response_ids", "index"}``; responses end with EOS and
    are cut to fit ``max_length`` tokens in all.

    A prompt longer than ``max_prompt_length`` tokens (default and upper bound ``max_length - 1``, so at
    least one response token fits) is handled as ``long_examples`` says: ``"drop"`` skips the example,
    ``"truncate"`` keeps the prompt's last ``max_prompt_length`` tokens, ``"error"`` raises a DataError
    naming the example. ``stats``, if given, receives the counts (examples, kept, dropped, truncated)."""
    if long_examples not in LONG_EXAMPLES:
        raise DataError(f"long_examples must be one of {', '.join(LONG_EXAMPLES)}, got {long_examples!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    prompt_limit = max_length - 1 if max_prompt_length is None else min(max_prompt_length, max_length - 1)
    keep = []
    for i, ex in enumerate(examples):
        if ex.target is None:
            if require_target:
                raise DataError(f"{ex.source or f'example {i}'}: the example has no target response to train on")
            continue
        keep.append(i)
    counts = {"examples": len(examples), "without_target": len(examples) - len(keep), "too_long": 0,
              "dropped": 0, "truncated": 0, "kept": 0, "max_length": max_length, "max_prompt_length": prompt_limit,
              "long_examples": long_examples}
    out = []
    if keep:
        prompts = tokenizer([format_prompt(tokenizer, examples[i], prompt_format) for i in keep],
                            add_special_tokens=False).input_ids
        targets = tokenizer([examples[i].target for i in keep], add_special_tokens=False).input_ids
        for i, p, r in zip(keep, prompts, targets):
            if len(p) > prompt_limit:
                counts["too_long"] += 1
                if long_examples == "error":
                    raise DataError(f"{examples[i].source or f'example {i}'}: prompt has {len(p)} tokens, more than "
                                    f"the {prompt_limit} that max_length={max_length}"
                                    f"{'' if max_prompt_length is None else f' and max_prompt_length={max_prompt_length}'}"
                                    f" allow; raise the limits, or set data.long_examples to drop or truncate")
                if long_examples == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
                p = p[len(p) - prompt_limit:]
            out.append({"prompt_ids": p, "response_ids": (r + [eos])[: max_length - len(p)], "index": i})
    counts["kept"] = len(out)
    if counts["too_long"]:
        log.warning("%d of %d examples have a prompt longer than %d tokens: %s (data.long_examples=%s)",
                    counts["too_long"], len(keep), prompt_limit,
                    "dropped" if long_examples == "drop" else "left-truncated", long_examples)
    if stats is not None:
        stats.update(counts)
    return out


@dataclass
class DiffusionCollator:
    """Batches tokenized examples for masked-diffusion training (see the module docstring)."""

    pad_id: int
    eos_id: int
    response_length: int | None = None
    pad_response_with_eos: bool = True

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        resp_len = [len(it["response_ids"]) for it in items]
        target = self.response_length or max(resp_len)
        rows = []
        for it in items:
            r = list(it["response_ids"])[:target] if self.response_length else list(it["response_ids"])
            n_eos = max(target - len(r), 0) if self.pad_response_with_eos else 0
            rows.append((it["prompt_ids"], r + [self.eos_id] * n_eos))
        length = max(len(p) + len(r) for p, r in rows)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        response = torch.zeros((b, length), dtype=torch.bool)
        prompt = torch.zeros((b, length), dtype=torch.bool)
        for j, (p, r) in enumerate(rows):
            n = len(p) + len(r)
            input_ids[j, :n] = torch.as_tensor(p + r, dtype=torch.long)
            attention[j, :n] = 1
            prompt[j, : len(p)] = True
            response[j, len(p):n] = True
        batch = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response, "prompt_mask": prompt}
        if "index" in items[0]:
            batch["index"] = torch.as_tensor([it["index"] for it in items], dtype=torch.long)
        return batch
