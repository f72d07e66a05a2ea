"""Instruction following on Dolly-format (or chat, prompt/completion) data, scored with ROUGE-L as MiniLLM computes it.

Records have an ``instruction``, an optional ``input`` (Hugging Face Dolly calls it ``context``)
and an ``output`` (``response`` in HF Dolly) that is one reference string or a list of them
(Super-NaturalInstructions has several). This is the data of SelfFusion's instruction-tuning
experiments: the MiniLLM release, trained on Dolly and evaluated on Dolly, Self-Instruct, Vicuna,
S-NI and UnNI.

Prompt: the Dolly/Alpaca template of SelfFusion appendix A.2, character for character what
MiniLLM's ``tools/process_data_dolly.py`` writes into the ``prompt`` field of its data files. As
there, a record whose input is absent or empty uses the variant without the ``### Input:``
section (a whitespace-only input still counts as an input).

Metric (MiniLLM ``rouge_metric.py``): ``rouge_score.rouge_scorer.RougeScorer(["rougeL"],
use_stemmer=True)``, F-measure of the prediction against each reference, maximum over the
references, times 100; the aggregate is the mean over items. MiniLLM's only text processing
before scoring is cutting the response at ``<|endoftext|>`` and ``str.strip()``; the rest of the
normalisation happens inside ``rouge_score``'s tokenizer: lowercase, every run of characters
outside ``[a-z0-9]`` becomes a separator, and Porter stemming of tokens longer than 3
characters. So punctuation and case never matter, and text without any ASCII letter or digit
(e.g. Chinese) scores 0.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .base import Example, Task
from .chat import (FORMATS, TURNS, build_prompt, records_to_examples,  # noqa: F401 (build_prompt re-exported)
                   references_of)
from .io import DataError, read_records

@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure x100 of ``prediction``, maximum over ``references`` (MiniLLM)."""
    if not references:
        raise ValueError("ROUGE-L needs at least one reference")
    prediction = prediction.strip()
    return 100.0 * max(_scorer().score(target=ref, prediction=prediction)["rougeL"].fmeasure
                       for ref in references)


class InstructTask(Task):
    """Instruction following with MiniLLM's ROUGE-L (scores in [0, 100]).

    The records may be in any format of :mod:`dlmdistill.tasks.chat` (Alpaca/Dolly, chat ``messages``,
    ``prompt``/``completion``, plain ``text``): ``format="auto"`` detects it from the first record and
    logs it. ``turns`` picks the assistant turns of multi-turn conversations that become examples."""

    name = "instruct"
    metric = "rouge_l"
    has_default_eval_data = False

    def __init__(self, format: str = "auto", turns: str = "last") -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; valid formats: {', '.join(FORMATS)}")
        if turns not in TURNS:
            raise ValueError(f"unknown turns {turns!r}; valid values: {', '.join(TURNS)}")
        self.format, self.turns = format, turns

    def load(self, source: str | None = None, split: str = "test", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        """Read a file, folder (``{split}.jsonl``, ``valid.jsonl`` for test) or HF id in any supported format."""
        if source is None:
            which = "data.train_source" if split == "train" else "data.eval_source (dlmdistill evaluate: --source)"
            raise DataError(f"the instruct task needs a source (it has no data of its own): set {which} to a "
                            f".jsonl/.json/.csv file (Alpaca/Dolly, chat 'messages', 'prompt'/'completion' or "
                            f"'text' records), a folder such as MiniLLM's data/dolly, or a Hugging Face dataset id")
        return records_to_examples(read_records(source, split)[:limit], self.format, self.turns, name=str(source))

    def score(self, example: Example, completion: str) -> float:
        if not example.references:
            raise DataError(f"{example.source}: a plain-text record has no reference response to score against")
        return rouge_l(completion, example.references)

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        per_ref = [rouge_l(completion, [ref]) for ref in example.references]
        return {"rouge_l_per_reference": per_ref}
