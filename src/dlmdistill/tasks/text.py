"""Plain text: (continued) pretraining of a DLM with the masked-diffusion objective.

Each record becomes an example with an empty prompt and the text as the target, so the forward
process may mask any of its tokens: the unconditional masked-diffusion pretraining of SMDM and
LLaDA. Records come from any source ``io.read_records`` reads (JSONL, JSON, CSV, folders, hub
ids); ``fields`` names the text fields, concatenated with blank lines (e.g. Dolly's
``instruction``, ``input`` and ``output`` for pretraining on that corpus's text). There is no
verifier: evaluate a pretrained model on a downstream task instead.
"""

from __future__ import annotations

import random

from ..errors import UserError
from .base import Example, Task
from .io import DataError, first_field, read_records


class TextTask(Task):
    """Unconditional text for masked-diffusion pretraining."""

    name = "text"
    metric = "none"
    has_default_eval_data = False

    def __init__(self, fields: list[str] | tuple[str, ...] = ("text",), separator: str = "\n\n") -> None:
        self.fields = tuple(fields)
        self.separator = separator

    def load(self, source: str | None = None, split: str = "train", limit: int | None = None,
             seed: int = 0) -> list[Example]:
        if source is None:
            raise UserError(f"the text task has no default data for split {split!r}: set data.train_source (or "
                            f"data.eval_source) to a JSONL/JSON/CSV file, a folder or a dataset id")
        examples = []
        for record, where in read_records(source, split):
            for f in self.fields:
                if isinstance(record.get(f), (list, dict)):
                    raise DataError(f"{where}: field {f!r} holds a {type(record[f]).__name__}, not text; for chat "
                                    f"'messages' or prompt/completion records use the instruct (alias chat) task, "
                                    f"which applies the chat template")
            parts = [str(record[f]) for f in self.fields if record.get(f)]
            if not parts:  # raises a DataError naming the fields
                first_field(record, self.fields, where)
            examples.append(Example(prompt="", target=self.separator.join(parts), source=where))
        if limit is not None and limit < len(examples):
            examples = random.Random(seed).sample(examples, limit)
        return examples

    def score(self, example: Example, completion: str) -> float:
        raise NotImplementedError("plain text has no metric; evaluate the model on a downstream task")
