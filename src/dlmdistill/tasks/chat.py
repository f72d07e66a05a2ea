"""Record formats of instruction data, detected from the first record, and the default chat template.

The formats (the dataset formats of TRL's SFT trainer and of the dLLM library):

* ``messages``: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``,
  conversational. The response is an assistant turn; the prompt is the conversation before it (system
  and earlier user/assistant turns), shown to the model through the tokenizer's chat template.
  ``turns="last"`` makes one example per record (the last assistant turn; turns after it are
  ignored); ``turns="all"`` one example per assistant turn, so every assistant turn is trained on
  (each with the turns before it as its prompt; the loss never covers a user turn).
* ``prompt_completion``: ``{"prompt": ..., "completion": ...}``. Strings are used as they are (the
  prompt goes through ``data.prompt_format`` like any task's prompt); a ``prompt`` that is a message
  list is conversational (TRL's conversational prompt-completion), with ``completion`` a string or a
  list holding one assistant message.
* ``alpaca``: ``{"instruction", "input", "output"}`` (Hugging Face Dolly's ``context`` and ``response``
  are accepted for ``input`` and ``output``); the prompt is the Alpaca/Dolly template of
  :mod:`dlmdistill.tasks.instruct`.
* ``text``: ``{"text": ...}``: an empty prompt and the text as the response (masked-diffusion
  pretraining on the text; no reference to score against).

A tokenizer without a chat template (the character and BPE tokenizers built in-project) gets
:data:`DEFAULT_CHAT_TEMPLATE`, a ChatML-style template: every message becomes
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and the prompt ends with ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Callable

from .base import Example
from .io import DataError, Record, first_field, require

log = logging.getLogger(__name__)

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


def references_of(output: Any, source: str) -> list[str]:
    """The reference list of a record's output field: a string or a non-empty list of strings."""
    refs = [output] if isinstance(output, str) else output
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{source}: field 'output' must be a string or a non-empty list of strings, "
                        f"got {type(output).__name__}")
    return refs


FORMATS: tuple[str, ...] = ("auto", "messages", "prompt_completion", "alpaca", "text")
TURNS: tuple[str, ...] = ("last", "all")

#: The chat template used where the tokenizer has none (ChatML-style, as Qwen and SmolLM2 use).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _default_template() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(DEFAULT_CHAT_TEMPLATE)


def render_default(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """``messages`` rendered with :data:`DEFAULT_CHAT_TEMPLATE`."""
    return _default_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def detect_format(record: Record, where: str) -> str:
    """The format of ``record`` (one of :data:`FORMATS` but ``auto``), by its fields."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    present = ", ".join(sorted(record)) or "none"
    raise DataError(f"{where}: cannot tell the data format from the fields ({present}); expected 'messages' "
                    f"(chat), 'prompt' + 'completion', 'instruction' + 'output' (Alpaca/Dolly) or 'text'")


def check_messages(value: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    """``value`` as a list of ``{"role": str, "content": str}``; a DataError naming the message otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages "
                        f"{{'role': ..., 'content': ...}}, got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{k}] must be an object with string 'role' and 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversation(prompt: list[dict[str, str]], response: str, where: str) -> Example:
    return Example(prompt=render_default(prompt), target=response, references=[response], source=where,
                   messages=prompt)


def from_messages(record: Record, where: str, turns: str = "last") -> list[Example]:
    msgs = check_messages(require(record, "messages", where), where)
    assistant = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{where}: the conversation has no 'assistant' message to train on "
                        f"(roles: {', '.join(m['role'] for m in msgs)})")
    chosen = assistant[-1:] if turns == "last" else assistant
    return [_conversation(msgs[:k], msgs[k]["content"], where if len(chosen) == 1 else f"{where}{TURN} {k}")
            for k in chosen]


TURN = " turn"  # the source of the k-th assistant turn of a record: "file.jsonl:3 turn 4"


def record_source(source: str) -> str:
    """The record an example's ``source`` comes from (``file.jsonl:3 turn 4`` -> ``file.jsonl:3``)."""
    head, sep, tail = source.rpartition(TURN + " ")
    return head if sep and tail.isdigit() else source


def from_prompt_completion(record: Record, where: str, turns: str = "last") -> list[Example]:
    prompt, completion = require(record, "prompt", where), require(record, "completion", where)
    if isinstance(completion, list):
        msgs = check_messages(completion, where, "completion")
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: field 'completion' must hold one 'assistant' message, got roles "
                            f"{[m['role'] for m in msgs]}")
        completion = msgs[0]["content"]
    elif not isinstance(completion, str):
        raise DataError(f"{where}: field 'completion' must be a string or a message list, got {type(completion).__name__}")
    if isinstance(prompt, list):
        return [_conversation(check_messages(prompt, where, "prompt"), completion, where)]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string or a message list, got {type(prompt).__name__}")
    return [Example(prompt=prompt, target=completion, references=[completion], source=where)]


def from_alpaca(record: Record, where: str, turns: str = "last") -> list[Example]:
    instruction = require(record, "instruction", where)
    input_text = record.get("input", record.get("context")) or ""
    refs = references_of(first_field(record, ("output", "response"), where), where)
    return [Example(prompt=build_prompt(instruction, input_text), target=refs[0], references=refs, source=where,
                    meta={"instruction": instruction, "input": input_text})]


def from_text(record: Record, where: str, turns: str = "last") -> list[Example]:
    text = require(record, "text", where)
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    return [Example(prompt="", target=text, source=where)]


CONVERTERS: dict[str, Callable[..., list[Example]]] = {
    "messages": from_messages, "prompt_completion": from_prompt_completion, "alpaca": from_alpaca, "text": from_text,
}


def records_to_examples(records: list[tuple[Record, str]], fmt: str = "auto", turns: str = "last",
                        name: str = "") -> list[Example]:
    """Examples of ``records`` in format ``fmt`` (``auto``: detected from the first record and logged).
    Every record must have the fields of that format; a record that lacks them is a DataError naming it."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if turns not in TURNS:
        raise DataError(f"unknown turns {turns!r}; valid values: {', '.join(TURNS)}")
    if not records:
        return []
    if fmt == "auto":
        fmt = detect_format(*records[0])
        log.info("%s: detected the %r data format from the first record", name or records[0][1], fmt)
    convert = CONVERTERS[fmt]
    return [ex for record, where in records for ex in convert(record, where, turns)]
