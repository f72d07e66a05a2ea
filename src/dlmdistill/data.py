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

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from .config import field
from .tasks.base import Example
from .tasks.io import DataError

__all__ = ["DataConfig", "DataError", "DiffusionCollator", "load_examples", "tokenize_examples", "format_prompt"]


@dataclass
class DataConfig:
    task: str = field("countdown", help="task name: countdown, sudoku, gsm8k, math500, instruct "
                     "(aliases dolly, rouge), text")
    task_kwargs: dict = field(default_factory=dict, help="task options, e.g. {style: d1} (countdown, sudoku) "
                                "or {fields: [instruction, output]} (text); a wrong key lists the task's options")
    train_source: str | None = field(None, help="training data: local JSONL/CSV/folder or a Hugging Face dataset "
                                     "id; null = the task's default (generated for countdown/sudoku)")
    train_split: str = field("train", help="split of train_source")
    train_limit: int | None = field(None, help="use at most this many training examples (or generate this many)")
    eval_source: str | None = field(None, help="evaluation data (same forms as train_source)")
    eval_split: str = field("test", help="split of eval_source")
    eval_limit: int | None = field(None, help="evaluate on at most this many examples")
    max_length: int = field(256, help="maximum prompt + response tokens; longer responses are truncated, "
                            "a longer prompt is an error")
    response_length: int | None = field(None, help="pad every response with trained EOS to this length "
                                        "(null = to the longest response in the batch)")
    pad_response_with_eos: bool = field(True, help="pad responses with trained EOS tokens (LLaDA/SMDM)")
    prompt_format: Literal["plain", "chat"] = field("plain", help="'chat' wraps prompts in the tokenizer's chat template")
    seed: int = field(0, help="seed for generated data and subsampling")

    def validate(self) -> None:
        from .tasks.registry import task_options

        options = task_options(self.task)  # an unknown task name is an error here, before anything runs
        unknown = [k for k in self.task_kwargs if k not in options]
        if unknown:
            raise ValueError(f"task_kwargs: task {self.task!r} has no option {', '.join(repr(k) for k in unknown)}; "
                             f"its options: {', '.join(options) or 'none'}")
        for name in ("train_limit", "eval_limit", "response_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {value}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt and a response token), got {self.max_length}")


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


def format_prompt(tokenizer, prompt: str, fmt: str = "plain") -> str:
    """The prompt text as the model sees it (``chat`` applies the tokenizer's chat template)."""
    if fmt == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("prompt_format is 'chat' but the tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str, fmt: str = "plain") -> list[int]:
    """Token ids of the formatted prompt (no special tokens added)."""
    return tokenizer(format_prompt(tokenizer, prompt, fmt), add_special_tokens=False).input_ids


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_length: int, prompt_format: str = "plain",
                      require_target: bool = True) -> list[dict[str, Any]]:
    """Token ids for each example: ``{"prompt_ids", "response_ids", "index"}``; responses end with EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    keep = []
    for i, ex in enumerate(examples):
        if ex.target is None:
            if require_target:
                raise DataError(f"{ex.source or f'example {i}'}: the example has no target response to train on")
            continue
        keep.append(i)
    if not keep:
        return []
    prompts = tokenizer([format_prompt(tokenizer, examples[i].prompt, prompt_format) for i in keep],
                        add_special_tokens=False).input_ids
    targets = tokenizer([examples[i].target for i in keep], add_special_tokens=False).input_ids
    out = []
    for i, p, r in zip(keep, prompts, targets):
        if len(p) >= max_length:
            raise DataError(f"{examples[i].source or f'example {i}'}: prompt has {len(p)} tokens, more than "
                            f"max_length={max_length} allows; raise data.max_length or shorten the prompt")
        out.append({"prompt_ids": p, "response_ids": (r + [eos])[: max_length - len(p)], "index": i})
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
