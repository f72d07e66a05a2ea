"""Data formats of the instruct (alias chat) task: detection, prompt/response split, errors."""

import json
import logging

import pytest

from dlmdistill.tasks.chat import DEFAULT_CHAT_TEMPLATE, render_default
from dlmdistill.tasks.io import DataError
from dlmdistill.tasks.registry import get_task


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


SYS = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
U2, A2 = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}


def test_default_template_renders_chatml_by_hand():
    assert render_default([SYS, U1]) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_default([U1], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert "im_start" in DEFAULT_CHAT_TEMPLATE


def test_single_turn_messages(tmp_path, caplog):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [U1, A1]}, {"messages": [U2, A2]}])
    with caplog.at_level(logging.INFO):
        ex = get_task("chat").load(f, split="train")
    assert "detected the 'messages' data format" in caplog.text
    assert [e.messages for e in ex] == [[U1], [U2]]
    assert [e.target for e in ex] == ["Hello!", "4"] and ex[1].references == ["4"]
    assert ex[0].prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ex[1].source.endswith("chat.jsonl:2")


def test_multi_turn_last_and_all_assistant_turns(tmp_path):
    f = write_jsonl(tmp_path / "multi.jsonl", [{"messages": [SYS, U1, A1, U2, A2]}])
    (last,) = get_task("chat").load(f)
    assert last.messages == [SYS, U1, A1, U2] and last.target == "4"
    assert last.prompt.endswith("<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                "<|im_start|>assistant\n")
    first, second = get_task("chat", turns="all").load(f)
    assert first.messages == [SYS, U1] and first.target == "Hello!"
    assert second.messages == [SYS, U1, A1, U2] and second.target == "4"
    assert first.source.endswith("multi.jsonl:1 turn 2") and second.source.endswith("multi.jsonl:1 turn 4")


def test_prompt_completion_strings_and_conversational(tmp_path):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    (ex,) = get_task("instruct").load(f)
    assert ex.prompt == "The sky is" and ex.target == " blue." and ex.messages is None
    g = write_jsonl(tmp_path / "pcc.jsonl", [{"prompt": [U1], "completion": [A1]}, {"prompt": [U2], "completion": "4"}])
    ex = get_task("instruct").load(g)
    assert [e.messages for e in ex] == [[U1], [U2]] and [e.target for e in ex] == ["Hello!", "4"]


def test_alpaca_and_hf_dolly_fields(tmp_path, caplog):
    f = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Name a colour", "context": "", "response": "red"},
    ])
    with caplog.at_level(logging.INFO):
        ex = get_task("instruct").load(f)
    assert "detected the 'alpaca' data format" in caplog.text
    assert ex[0].prompt == ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n")
    assert ex[0].target == "3" and ex[1].target == "red" and ex[1].messages is None
    assert ex[1].prompt.endswith("### Instruction:\nName a colour\n\n### Response:\n")


def test_plain_text_records(tmp_path):
    f = write_jsonl(tmp_path / "text.jsonl", [{"text": "once upon a time"}])
    (ex,) = get_task("chat").load(f, split="train")
    assert ex.prompt == "" and ex.target == "once upon a time" and ex.references == []
    with pytest.raises(DataError, match="no reference"):
        get_task("chat").score(ex, "x")


def test_forced_format_and_record_errors(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": [U1, A1]}, {"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: missing required field 'messages'"):
        get_task("chat").load(f)
    with pytest.raises(DataError, match=r"mixed\.jsonl:1: missing required field 'prompt'"):
        get_task("chat", format="prompt_completion").load(f)
    cases = [
        ({"messages": [U1, {"role": "assistant"}]}, r"bad\.jsonl:1: messages\[1\] must be an object"),
        ({"messages": [U1]}, r"bad\.jsonl:1: the conversation has no 'assistant' message"),
        ({"messages": "Hi"}, r"bad\.jsonl:1: field 'messages' must be a non-empty list"),
        ({"prompt": [U1], "completion": [U2]}, r"bad\.jsonl:1: field 'completion' must hold one 'assistant'"),
        ({"question": "q", "answer": "a"}, r"bad\.jsonl:1: cannot tell the data format.*answer, question"),
    ]
    for record, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            get_task("chat").load(write_jsonl(tmp_path / "bad.jsonl", [record]))


def test_unknown_options_are_user_errors():
    from dlmdistill.errors import UserError

    with pytest.raises(UserError, match="unknown format 'sharegpt'"):
        get_task("chat", format="sharegpt")
    with pytest.raises(UserError, match="unknown turns 'first'"):
        get_task("chat", turns="first")


def test_text_task_refuses_a_message_list(tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [U1, A1]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages' holds a list, not text"):
        get_task("text", fields=["messages"]).load(f)
