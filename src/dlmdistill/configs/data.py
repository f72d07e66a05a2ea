"""``DataConfig``: the task and its data (loading and tokenizing: ``dlmdistill.data``, which re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import field


LONG_EXAMPLES = ("drop", "truncate", "error")
#: The task of a run that names none and gives no training file.
DEFAULT_TASK = "countdown"


@dataclass
class DataConfig:
    task: str | None = field(None, help="task name: countdown, sudoku, gsm8k, math500, instruct (aliases chat, "
                             "auto, dolly, rouge), text; null = told from the records of train_source (chat "
                             "'messages', 'prompt'/'completion', Alpaca 'instruction'/'output': instruct; 'text': "
                             "text), or countdown when no train_source is given")
    task_kwargs: dict = field(default_factory=dict, help="task options, e.g. {style: d1} (countdown, sudoku) "
                                "or {fields: [instruction, output]} (text); a wrong key lists the task's options")
    train_source: str | None = field(None, help="training data: local JSONL/CSV/folder or a Hugging Face dataset "
                                     "id; null = the task's default (generated for countdown/sudoku)")
    train_split: str = field("train", help="split of train_source")
    train_limit: int | None = field(None, help="use at most this many training examples (or generate this many)")
    eval_source: str | None = field(None, help="evaluation data (same forms as train_source)")
    eval_split: str = field("test", help="split of eval_source")
    eval_limit: int | None = field(None, help="evaluate on at most this many examples")
    max_length: int = field(256, help="maximum prompt + response tokens; a training example that does not fit "
                            "is handled as long_examples says")
    max_prompt_length: int | None = field(None, help="maximum prompt tokens (null = max_length - 1); longer "
                                          "prompts are handled as long_examples says")
    long_examples: Literal["drop", "truncate", "error"] = field(
        "drop", help="a training example whose prompt exceeds max_prompt_length, or whose answer (with its EOS) "
        "exceeds what the prompt leaves of max_length (or response_length): 'drop' it, 'truncate' it (a prompt "
        "loses its first tokens, an answer its last ones but keeps its EOS as the last token, so the model still "
        "learns to stop), or 'error'; what is dropped or cut is counted in the log and in data_stats.json")
    long_answers: Literal["drop", "truncate", "error"] | None = field(
        None, help="an answer that does not fit: 'drop', 'truncate' or 'error' as for long_examples, which it "
        "replaces for answers (null = as long_examples); e.g. long_examples: drop with long_answers: truncate "
        "drops over-long prompts and cuts over-long answers (the Dolly configs)")
    response_length: int | None = field(None, help="pad every response with trained EOS to this length (null = "
                                        "to the longest response in the batch); a longer answer is handled as "
                                        "long_examples says")
    pad_response_with_eos: bool = field(True, help="pad responses with trained EOS tokens (LLaDA/SMDM)")
    prompt_format: Literal["plain", "chat"] = field("plain", help="'chat' wraps text prompts in the tokenizer's chat "
                                                    "template (conversational data always uses it)")
    seed: int = field(0, help="seed for generated data and subsampling")

    def validate(self) -> None:
        # the task name and its options are checked when a run builds the task (tasks.registry.get_task)
        for name in ("train_limit", "eval_limit", "response_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {value}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt and a response token), got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length must be >= 1 and below max_length={self.max_length} (room for a "
                             f"response token), got {self.max_prompt_length}")
        if self.long_examples not in LONG_EXAMPLES:
            raise ValueError(f"long_examples must be one of {', '.join(LONG_EXAMPLES)}, got {self.long_examples!r}")
        if self.long_answers is not None and self.long_answers not in LONG_EXAMPLES:
            raise ValueError(f"long_answers must be one of {', '.join(LONG_EXAMPLES)} or null, got {self.long_answers!r}")
