"""From task examples to training batches.

``DataConfig`` names the task and its sources (``resolve_task`` tells the task from the records when none
is named); ``load_examples`` turns it into ``Example`` lists (``holdout_split`` sets records aside for
evaluation); ``tokenize_examples`` turns examples into prompt/response token ids (response = target + EOS),
fitting them into ``max_length`` as ``long_examples`` says, with every drop and cut counted;
``DiffusionCollator`` lays a batch out as::

    [prompt][response][EOS padding ... ][pad ...]
     mask 1   mask 1    mask 1, trained   mask 0

EOS padding is trained (LLaDA/SMDM do this): at inference the response length is fixed, and the
model must learn to fill the tail with EOS. ``response_mask`` marks the positions the forward
process may mask (response + EOS padding); ``prompt_mask`` marks real prompt tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from .configs.data import LONG_EXAMPLES, DataConfig
from .tasks.base import Example
from .tasks.io import DataError

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "DiffusionCollator", "load_examples", "tokenize_examples", "format_prompt",
           "render_messages", "resolve_task", "holdout_split", "LONG_EXAMPLES"]


def load_examples(cfg: DataConfig, split: Literal["train", "eval"]) -> list[Example]:
    """The task's examples for the training or the evaluation split of ``cfg``."""
    from .tasks.registry import get_task

    task = get_task(resolve_task(cfg, split), **cfg.task_kwargs)
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


#: The task that trains on each record format of :mod:`dlmdistill.tasks.chat`.
FORMAT_TASKS = {"messages": "instruct", "prompt_completion": "instruct", "alpaca": "instruct", "text": "text"}
#: Fields that mark the records of the reasoning tasks: named in the error when no format is found, never
#: guessed (the task decides the prompt and the metric).
TASK_FIELDS = {"countdown": ({"numbers", "nums"}, {"target"}), "sudoku": ({"puzzle", "Puzzle", "quizzes"},),
               "gsm8k": ({"question"}, {"answer"}), "math500": ({"problem"}, {"solution"})}


def resolve_task(cfg: DataConfig, split: Literal["train", "eval"] = "train") -> str:
    """``cfg.task``, or where it is null the task the data calls for: the task of the record format of the
    first record of ``train_source`` (``eval_source`` for ``split="eval"``), see :data:`FORMAT_TASKS`, logged;
    :data:`~dlmdistill.configs.data.DEFAULT_TASK` when there is no source. Records of no known format are a
    DataError that names the task to give."""
    from .configs.data import DEFAULT_TASK
    from .tasks.chat import detect_format
    from .tasks.io import read_records

    if cfg.task is not None:
        return cfg.task
    source, data_split = (cfg.train_source, cfg.train_split) if split == "train" else (cfg.eval_source, cfg.eval_split)
    if source is None:
        return DEFAULT_TASK
    record, where = read_records(source, data_split)[0]
    try:
        fmt = detect_format(record, where)
    except DataError:
        raise DataError(_no_task_message(record, where)) from None
    task = FORMAT_TASKS[fmt]
    log.info("%s: data.task not given: the records are %r data, so the task is %r (data.task chooses another)",
             source, fmt, task)
    return task


def _no_task_message(record: dict[str, Any], where: str) -> str:
    present = ", ".join(sorted(record)) or "none"
    fits = [name for name, groups in TASK_FIELDS.items() if all(g & set(record) for g in groups)]
    if fits:
        return (f"{where}: data.task is not given and these records ({present}) look like {fits[0]} data: give "
                f"--task {fits[0]} (data.task)")
    return (f"{where}: data.task is not given and the fields of this record ({present}) do not tell the task: give "
            f"--task (data.task): instruct for chat 'messages', 'prompt' + 'completion' or Alpaca 'instruction' + "
            f"'output' records, text for 'text' records, or countdown, sudoku, gsm8k, math500 for their own files")


def holdout_split(examples: Sequence[Example], size: float, limit: int | None, seed: int, name: str = "training data"
                  ) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """``(train, held_out, info)``: a random slice of the *records* of ``examples`` held out for evaluation.

    ``size`` is a fraction of the records (below 1; rounded up) or a number of records, at most ``limit``.
    Every example of a record (the assistant turns of a conversation) goes to the same side, and a training
    example identical to a held-out one (a record that appears twice) is removed from training, so no
    record is on both sides. ``info`` has the counts and the held-out records' sources. Too few records to
    keep some for training is a DataError naming ``name``."""
    from .tasks.chat import record_source

    records: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        records.setdefault(record_source(ex.source) if ex.source else f"example {i}", []).append(i)
    n = len(records)
    k = math.ceil(size * n) if size < 1 else int(size)
    k = min(k, limit) if limit is not None else k
    if k >= n:
        raise DataError(f"{name}: {n} training record(s), too few to hold out {k} for evaluation and train on the "
                        f"rest; give data.eval_source, lower eval.holdout_size, or set eval.when_missing to skip")
    held = set(random.Random(seed).sample(sorted(records), k))
    evals = [examples[i] for key in records if key in held for i in records[key]]
    seen = {(ex.prompt, ex.target) for ex in evals}
    train = [examples[i] for key in records if key not in held for i in records[key]]
    kept = [ex for ex in train if (ex.prompt, ex.target) not in seen]
    info = {"source": "holdout", "records": n, "held_out_records": k, "held_out_examples": len(evals),
            "duplicates_removed": len(train) - len(kept), "holdout_size": size, "seed": seed,
            "held_out": [key for key in records if key in held]}
    return kept, evals, info


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
                      max_response_length: int | None = None, long_examples: str = "error",
                      long_answers: str | None = None, stats: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Token ids for each example: ``{"prompt_ids", "response_ids", "index"}``; a response is the target
    followed by EOS, and prompt + response fit in ``max_length`` tokens.

    What does not fit is handled as ``long_examples`` says: ``"drop"`` skips the example, ``"truncate"``
    cuts it, ``"error"`` raises a DataError naming the example; ``long_answers``, when given, replaces it for
    answers (e.g. over-long prompts dropped, over-long answers cut). A prompt may have ``max_prompt_length``
    tokens (default and upper bound ``max_length - 1``, so at least one response token fits); truncating
    keeps its last tokens. A response may have what the prompt leaves of ``max_length``, and at most
    ``max_response_length`` tokens; truncating keeps its first tokens and **its EOS as the last token**, so
    the model still learns to end an answer (a cut answer that never ends would teach it to fill every
    position). ``stats``, if given, receives the counts (docs/configuration.md, "Long examples"); what was
    dropped or cut is logged as one warning line for prompts and one for answers."""
    for name, policy in (("long_examples", long_examples), ("long_answers", long_answers or long_examples)):
        if policy not in LONG_EXAMPLES:
            raise DataError(f"{name} must be one of {', '.join(LONG_EXAMPLES)}, got {policy!r}")
    if max_response_length is not None and max_response_length < 1:
        raise DataError(f"max_response_length must be >= 1 (or None), got {max_response_length}")
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
    fit = _Fitter(max_length, prompt_limit, max_response_length, long_examples, max_prompt_length is not None,
                  answer_policy=long_answers)
    out = []
    if keep:
        prompts = tokenizer([format_prompt(tokenizer, examples[i], prompt_format) for i in keep],
                            add_special_tokens=False).input_ids
        targets = tokenizer([examples[i].target for i in keep], add_special_tokens=False).input_ids
        for i, p, r in zip(keep, prompts, targets):
            item = fit(p, r + [eos], examples[i].source or f"example {i}")
            if item is not None:
                out.append({**item, "index": i})
    fit.report(len(keep))
    if keep and not out:
        raise DataError(f"all {len(keep)} training examples were dropped as too long for max_length={max_length}"
                        f"{fit.limits_text()}: raise the limits, or set data.long_examples to truncate")
    if stats is not None:
        stats.update(fit.counts(len(examples), len(examples) - len(keep), len(out)))
    return out


class _Fitter:
    """Fits one example's prompt and response ids into the limits (see :func:`tokenize_examples`) and counts
    what it drops and cuts."""

    def __init__(self, max_length: int, prompt_limit: int, response_limit: int | None, policy: str,
                 explicit_prompt_limit: bool, answer_policy: str | None = None) -> None:
        self.max_length, self.prompt_limit, self.response_limit, self.policy = (max_length, prompt_limit,
                                                                               response_limit, policy)
        self.answer_policy = answer_policy or policy
        self.answer_setting = "data.long_answers" if answer_policy else "data.long_examples"
        self.explicit_prompt_limit = explicit_prompt_limit
        self.n = {k: 0 for k in ("too_long", "dropped", "truncated", "prompts_too_long", "prompts_dropped",
                                 "prompts_truncated", "responses_too_long", "responses_dropped",
                                 "responses_truncated", "longest_prompt", "longest_response")}
        self.worst: tuple[int, int] | None = None  # (tokens, room) of the longest answer that did not fit

    def __call__(self, p: list[int], r: list[int], where: str) -> dict[str, list[int]] | None:
        n = self.n
        n["longest_prompt"] = max(n["longest_prompt"], len(p))
        n["longest_response"] = max(n["longest_response"], len(r))
        cut = False
        if len(p) > self.prompt_limit:
            if self.policy == "error":
                raise DataError(f"{where}: prompt has {len(p)} tokens, more than the {self.prompt_limit} that "
                                f"max_length={self.max_length}"
                                f"{f' and max_prompt_length={self.prompt_limit}' if self.explicit_prompt_limit else ''}"
                                f" allow; raise the limits, or set data.long_examples to drop or truncate")
            if self._too_long("prompts"):
                return None
            p, cut = p[len(p) - self.prompt_limit:], True
        room = self.max_length - len(p)
        bound_by_response = self.response_limit is not None and self.response_limit < room
        room = self.response_limit if bound_by_response else room
        if len(r) > room:
            if self.answer_policy == "error":
                limit = (f"response_length={self.response_limit} allows" if bound_by_response else
                         f"max_length={self.max_length} leaves after its {len(p)}-token prompt")
                raise DataError(f"{where}: answer has {len(r)} tokens with its EOS, more than the {room} that {limit}; "
                                f"raise the limits, or set {self.answer_setting} to drop or truncate")
            if self.worst is None or len(r) > self.worst[0]:
                self.worst = (len(r), room)
            if self._too_long("responses", counted=cut):
                return None
            r, cut = r[: room - 1] + r[-1:], True  # the EOS stays the last token
        n["truncated"] += cut
        return {"prompt_ids": p, "response_ids": r}

    def _too_long(self, part: str, counted: bool = False) -> bool:
        """Count a too-long prompt or response; True when the example is dropped."""
        self.n[f"{part}_too_long"] += 1
        self.n["too_long"] += not counted
        if (self.answer_policy if part == "responses" else self.policy) == "drop":
            self.n[f"{part}_dropped"] += 1
            self.n["dropped"] += 1
            return True
        self.n[f"{part}_truncated"] += 1
        return False

    def limits_text(self) -> str:
        return (f", max_prompt_length={self.prompt_limit}" if self.explicit_prompt_limit else "") + \
            (f", response_length={self.response_limit}" if self.response_limit is not None else "")

    def report(self, total: int) -> None:
        n = self.n
        if n["prompts_too_long"]:
            log.warning("%d of %d examples have a prompt longer than %d tokens: %s (data.long_examples=%s)",
                        n["prompts_too_long"], total, self.prompt_limit,
                        "dropped" if self.policy == "drop" else "left-truncated", self.policy)
        if n["responses_too_long"]:
            limit = f"max_length={self.max_length} after their prompt" + (
                f" and response_length={self.response_limit}" if self.response_limit is not None else "")
            log.warning("%d of %d answers do not fit in %s (the longest: %d tokens with its EOS, where %d fit): %s "
                        "(%s=%s)", n["responses_too_long"], total, limit, *self.worst,
                        "dropped" if self.answer_policy == "drop" else "truncated, EOS kept as the last token",
                        self.answer_setting, self.answer_policy)

    def counts(self, examples: int, without_target: int, kept: int) -> dict[str, Any]:
        return {"examples": examples, "without_target": without_target, "kept": kept, **self.n,
                "max_length": self.max_length, "max_prompt_length": self.prompt_limit,
                "max_response_length": self.response_limit, "long_examples": self.policy,
                "long_answers": self.answer_policy,
                "truncated_response_eos": "kept"}


@dataclass
class DiffusionCollator:
    """Batches tokenized examples for masked-diffusion training (see the module docstring).

    With ``response_length``, a longer response is cut to that many tokens with its EOS kept as the last
    token, as :func:`tokenize_examples` truncates (the training recipes cut there, where the cut is counted
    in ``data_stats.json``, so this collator has nothing left to cut). What it cuts is counted in
    ``stats`` and announced by one warning line, the first time."""

    pad_id: int
    eos_id: int
    response_length: int | None = None
    pad_response_with_eos: bool = True
    stats: dict[str, Any] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.response_length is not None and self.response_length < 1:
            raise ValueError(f"response_length must be >= 1 (or None), got {self.response_length}")
        self.stats = {"responses": 0, "responses_truncated": 0, "longest_response": 0,
                      "response_length": self.response_length}

    def fit(self, responses: Sequence[Sequence[int]]) -> list[list[int]]:
        """``responses`` cut to ``response_length`` (EOS kept last), counted in ``stats``."""
        out = [list(r) for r in responses]
        limit = self.response_length
        longest = max(map(len, out), default=0)
        self.stats["responses"] += len(out)
        self.stats["longest_response"] = max(self.stats["longest_response"], longest)
        if limit is None or longest <= limit:
            return out
        cut = sum(len(r) > limit for r in out)
        if not self.stats["responses_truncated"]:
            log.warning("%d of %d answers in a batch are longer than response_length=%d (the longest: %d tokens): "
                        "cut to %d tokens, EOS kept as the last token (later cuts are only counted, in "
                        "DiffusionCollator.stats)", cut, len(out), limit, longest, limit)
        self.stats["responses_truncated"] += cut
        return [r if len(r) <= limit else r[: limit - 1] + [self.eos_id] for r in out]

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        responses = self.fit([it["response_ids"] for it in items])
        target = self.response_length if self.response_length is not None else max(map(len, responses))
        rows = []
        for it, r in zip(items, responses):
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
        # each row's response positions, built here on the host so a step can gather them without a
        # data-dependent shape (training.static_shapes); -1 pads the shorter responses
        width = max(len(r) for _, r in rows)
        index = torch.full((b, width), -1, dtype=torch.long)
        for j, (p, r) in enumerate(rows):
            index[j, : len(r)] = torch.arange(len(p), len(p) + len(r))
        batch = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response, "prompt_mask": prompt,
                 "response_index": index}
        if "index" in items[0]:
            batch["index"] = torch.as_tensor([it["index"] for it in items], dtype=torch.long)
        return batch
