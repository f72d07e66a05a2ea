"""The task interface: data, prompts, references and verifiers.

A *task* knows how to load its examples (from local JSONL/CSV or a Hugging Face dataset id),
how to render an example as prompt text and as a training target, and how to score a model's
completion. Training (SFT, SelfFusion, KD), evaluation and the on-policy methods (d-OPSD,
diffu-GRPO) all go through this interface, so the prompt seen at training time is the prompt
seen at evaluation time.

Scores are floats:
* accuracy tasks return a reward in [0, 1] (1 = correct; Sudoku may return a graded value);
* instruction following returns ROUGE-L F in [0, 100] (max over references).
``Task.is_correct`` turns a score into the accept/reject decision used by d-OPSD's pass@k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

#: Prompt styles of the reasoning tasks: ``"compact"`` is a one-line prompt for tiny
#: character-level models trained from scratch, ``"d1"`` a natural-language instruction in the
#: spirit of the d1 / d-OPSD prompts for pretrained instruction models.
PromptStyle = Literal["compact", "d1"]
PROMPT_STYLES: tuple[str, ...] = ("compact", "d1")


@dataclass
class Example:
    """One task item.

    prompt:     the text given to the model (already formatted with the task's template).
    target:     the training response text (reasoning + answer for reasoning tasks); None if
                the item has no reference response (e.g. a Countdown test puzzle).
    references: reference answers used by the metric (ROUGE-L refs, the gold answer, ...).
    meta:       task-specific data the verifier needs (numbers and target, puzzle and solution).
    source:     where the item came from, e.g. "path/to/file.jsonl:17", for error messages.
    messages:   for conversational data, the conversation before the response as chat messages
                (``[{"role": ..., "content": ...}, ...]``); the model sees them through the
                tokenizer's chat template (see ``dlmdistill.data.format_prompt``), and ``prompt``
                holds them rendered with the default template, for logs and generation files.
    """

    prompt: str
    target: str | None = None
    references: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    messages: list[dict[str, str]] | None = None


class Task:
    """Base class. Subclasses set ``name`` and ``metric`` and implement the methods below."""

    name: str = "task"
    metric: str = "accuracy"  # "accuracy" or "rouge_l"
    #: default threshold on ``score`` above which a completion counts as correct
    correct_threshold: float = 1.0
    #: whether ``load(None, split="test")`` gives evaluation data of the task's own (generated puzzles, a
    #: hub default); a task without (your own data) is evaluated as ``eval.when_missing`` says
    has_default_eval_data: bool = True

    def load(self, source: str | None = None, split: str = "test", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        """Load examples. ``source`` is a local file/folder or a HF dataset id; ``None`` means
        the task's default (generated data for Countdown/Sudoku)."""
        raise NotImplementedError

    def score(self, example: Example, completion: str) -> float:
        """Score one completion (the decoded response text, special tokens removed)."""
        raise NotImplementedError

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        """Extra per-item fields written to the generations JSONL (parsed answer, cell accuracy ...)."""
        return {}

    def is_correct(self, score: float, threshold: float | None = None) -> bool:
        return score >= (self.correct_threshold if threshold is None else threshold)

    def aggregate(self, scores: Iterable[float], details: Iterable[dict[str, Any]] = (),
                  examples: Sequence[Example] | None = None) -> dict[str, float]:
        """Summary metrics over a list of scores (mean x100 for accuracy; mean for ROUGE-L). With the
        ``examples`` the scores belong to, each of the task's :meth:`subsets` adds
        ``accuracy_<name>`` (or ``<metric>_<name>``): the metric over that subset alone."""
        scores = list(scores)
        metrics = self._aggregate(scores)
        if examples is not None:
            for name, keep in self.subsets(examples).items():
                kept = [s for s, k in zip(scores, keep) if k]
                if kept:
                    metrics[f"{self.metric}_{name}"] = self._aggregate(kept)[self.metric]
                metrics[f"n_{name}"] = float(len(kept))
        return metrics

    def _aggregate(self, scores: list[float]) -> dict[str, float]:
        n = max(len(scores), 1)
        if self.metric == "accuracy":
            return {"accuracy": 100.0 * sum(1.0 for s in scores if self.is_correct(s)) / n,
                    "mean_reward": sum(scores) / n}
        return {self.metric: sum(scores) / n}

    def subsets(self, examples: Sequence[Example]) -> dict[str, list[bool]]:
        """Named subsets of ``examples`` whose metric is reported beside the whole set's (a mask per
        name, aligned with ``examples``). None by default."""
        return {}


class PuzzleTask(Task):
    """A task whose puzzles the product generates (Countdown, Sudoku): a held-out test set, read from
    ``test_source`` or generated from ``test_seed``, and training puzzles generated from a seed or read from
    a file, never one of the held-out ones.

    Subclasses set ``test_source``, ``num_train`` and implement ``_read`` (the examples of a file),
    ``_generate_test`` (the generated held-out set), ``_train_from_file`` and ``_generate_train`` (which
    leave out what ``_held_out(None)`` holds)."""

    test_source: str | None = None
    num_train: int = 0

    def load(self, source: str | None = None, split: str = "test", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        """``split="test"``: the puzzles of ``source``, else ``test_source``, else generated. ``split="train"``:
        the puzzles of ``source`` if given, else ``limit`` (default ``num_train``) generated from ``seed``;
        held-out puzzles are always left out."""
        if split == "test":
            return self._held_out(source)[:limit]
        if split != "train":
            raise ValueError(f"unknown split {split!r} for {self.name}; valid: train, test")
        if source is not None:
            return self._train_from_file(source, limit)
        return self._generate_train(limit or self.num_train, seed)

    def _held_out(self, source: str | None) -> list[Example]:
        source = source or self.test_source
        return self._read(source, "test") if source is not None else self._generate_test()

    def _read(self, source: str, split: str) -> list[Example]:
        raise NotImplementedError

    def _generate_test(self) -> list[Example]:
        raise NotImplementedError

    def _train_from_file(self, source: str, limit: int | None) -> list[Example]:
        raise NotImplementedError

    def _generate_train(self, n: int, seed: int) -> list[Example]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# helpers shared by the reasoning tasks


def check_style(style: str) -> str:
    """Validate a prompt style name and return it."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; valid styles: {', '.join(PROMPT_STYLES)}")
    return style


def format_reasoning(reasoning: str, answer: str) -> str:
    """The response format of every reasoning task, at training and at evaluation time:
    ``<reasoning>...</reasoning><answer>...</answer>``."""
    return f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"


_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"
#: The tags of the response format, removed by the fallbacks that read untagged text.
_TAG = re.compile(r"</?(?:answer|reasoning)>")
#: A tag cut off by the end of the generation (``</``, ``</ans``, ``<reason``): no letters may follow it.
_PARTIAL_TAG = re.compile(r"</?(?:a(?:n(?:s(?:w(?:e(?:r)?)?)?)?)?"
                          r"|r(?:e(?:a(?:s(?:o(?:n(?:i(?:n(?:g)?)?)?)?)?)?)?)?)?\s*$")
#: Special tokens left in text decoded with ``skip_special_tokens=False`` (d1's generation files).
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_END_TOKENS = ("<|eot_id|>", "<|endoftext|>", "<|im_end|>")


def clean_completion(text: str) -> str:
    """The response as our own decoder returns it: cut at the first end token (``<|eot_id|>``,
    ``<|endoftext|>``, ``<|im_end|>``) and without other special tokens ``<|...|>``. Generation
    files written with ``skip_special_tokens=False`` (d1's) hold them."""
    cut = min((i for i in (text.find(t) for t in _END_TOKENS) if i >= 0), default=len(text))
    return _SPECIAL_TOKEN.sub("", text[:cut])


def _drop_partial_tag(text: str) -> str:
    return _PARTIAL_TAG.sub("", text)


def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>`` block, stripped, or None if there is none.

    A final block that was opened but never closed (generation ran out of tokens) still counts:
    its content runs to the end of the text, less a closing tag cut short (``</``, ``</answ``).
    """
    start = text.rfind(_ANSWER_OPEN)
    if start < 0:
        return None
    content = text[start + len(_ANSWER_OPEN):]
    end = content.find(_ANSWER_CLOSE)
    return (_drop_partial_tag(content) if end < 0 else content[:end]).strip()


def after_answer(text: str) -> str:
    """Where an untagged answer may be, when :func:`extract_answer` found none or an empty one:
    the whole text if it has no ``<answer>`` tag, else what follows the last block's closing
    tag (an empty block answers nothing; the reasoning before it is not an answer)."""
    start = text.rfind(_ANSWER_OPEN)
    if start < 0:
        return text
    end = text.find(_ANSWER_CLOSE, start)
    return "" if end < 0 else text[end + len(_ANSWER_CLOSE):]


def strip_tags(text: str) -> str:
    """``text`` with every ``<answer>``/``<reasoning>`` tag (opening or closing) and a tag cut
    short at the end replaced by a line break: what is left of a completion whose tags are
    broken (an answer after a stray ``</answer>``, a final ``</``)."""
    return _TAG.sub("\n", _drop_partial_tag(text))


def last_line(text: str) -> str | None:
    """The last non-empty line of ``text`` once tags are removed (:func:`strip_tags`), stripped,
    or None: the fallback answer when a completion has no ``<answer>`` block."""
    lines = [line.strip() for line in strip_tags(text).splitlines() if line.strip()]
    return lines[-1] if lines else None


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str, allow_unclosed: bool = False) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``,
    with nested braces; None if there is none. A box whose braces never close gives None, or,
    with ``allow_unclosed``, everything after its ``{`` up to the next tag (a generation cut off
    inside the box, or a box closed by ``</answer>`` instead of ``}``)."""
    start, command = max((text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command):]
    if rest.startswith(" "):  # "\boxed 5": the next word
        words = rest.split()
        return words[0].rstrip("$.") if words else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    if not allow_unclosed:
        return None
    return _drop_partial_tag(_TAG.split(rest[1:], maxsplit=1)[0]).strip()
