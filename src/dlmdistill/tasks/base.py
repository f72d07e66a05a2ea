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

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

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
    """

    prompt: str
    target: str | None = None
    references: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


class Task:
    """Base class. Subclasses set ``name`` and ``metric`` and implement the methods below."""

    name: str = "task"
    metric: str = "accuracy"  # "accuracy" or "rouge_l"
    #: default threshold on ``score`` above which a completion counts as correct
    correct_threshold: float = 1.0

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

    def aggregate(self, scores: Iterable[float], details: Iterable[dict[str, Any]] = ()) -> dict[str, float]:
        """Summary metrics over a list of scores (mean x100 for accuracy; mean for ROUGE-L)."""
        scores = list(scores)
        n = max(len(scores), 1)
        if self.metric == "accuracy":
            return {"accuracy": 100.0 * sum(1.0 for s in scores if self.is_correct(s)) / n,
                    "mean_reward": sum(scores) / n}
        return {self.metric: sum(scores) / n}


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


def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>`` block, stripped, or None if there is none.

    A final block that was opened but never closed (generation ran out of tokens) still counts:
    its content runs to the end of the text.
    """
    start = text.rfind(_ANSWER_OPEN)
    if start < 0:
        return None
    content = text[start + len(_ANSWER_OPEN):]
    end = content.find(_ANSWER_CLOSE)
    return (content if end < 0 else content[:end]).strip()


def last_line(text: str) -> str | None:
    """The last non-empty line of ``text`` (stripped), or None: the fallback answer when a
    completion has no ``<answer>`` block."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None

