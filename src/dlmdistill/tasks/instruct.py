"""Instruction following on Dolly-format data, scored with ROUGE-L as MiniLLM computes it.

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
from .io import DataError, first_field, read_records, require

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(instruction: str, input_text: str = "") -> str:
    """The SelfFusion / MiniLLM prompt for one record."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


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


def references_of(output: Any, source: str) -> list[str]:
    """The reference list of a record's output field: a string or a non-empty list of strings."""
    refs = [output] if isinstance(output, str) else output
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{source}: field 'output' must be a string or a non-empty list of strings, "
                        f"got {type(output).__name__}")
    return refs


class InstructTask(Task):
    """Dolly-format instruction following with MiniLLM's ROUGE-L (scores in [0, 100])."""

    name = "instruct"
    metric = "rouge_l"

    def load(self, source: str | None = None, split: str = "test", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        """Read a Dolly-format file, folder (``{split}.jsonl``, ``valid.jsonl`` for test) or HF id."""
        if source is None:
            raise DataError("the instruct task needs a source: a Dolly-format .jsonl/.json/.csv file, "
                            "a folder such as MiniLLM's data/dolly, or a Hugging Face dataset id")
        examples = []
        for record, where in read_records(source, split)[:limit]:
            instruction = require(record, "instruction", where)
            input_text = record.get("input", record.get("context")) or ""
            refs = references_of(first_field(record, ("output", "response"), where), where)
            examples.append(Example(prompt=build_prompt(instruction, input_text), target=refs[0],
                                    references=refs, source=where,
                                    meta={"instruction": instruction, "input": input_text}))
        return examples

    def score(self, example: Example, completion: str) -> float:
        return rouge_l(completion, example.references)

    def details(self, example: Example, completion: str) -> dict[str, Any]:
        per_ref = [rouge_l(completion, [ref]) for ref in example.references]
        return {"rouge_l_per_reference": per_ref}
