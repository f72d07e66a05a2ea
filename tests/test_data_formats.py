"""Chat templates and long examples at tokenization (dlmdistill.data)."""

import json
import logging

import pytest

from dlmdistill.data import DataConfig, encode_prompt, format_prompt, tokenize_examples
from dlmdistill.models import char_tokenizer
from dlmdistill.tasks.base import Example
from dlmdistill.tasks.io import DataError

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 <>|_[]:!?+\n"
U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}


@pytest.fixture
def tok():
    return char_tokenizer([CHARS])


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_messages_use_the_tokenizers_template(tok):
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    ex = Example(prompt="ignored", target="4", messages=[{"role": "system", "content": "Be brief"}, U])
    assert format_prompt(tok, ex) == "[system]Be brief\n[user]Hi\n[assistant]"
    (item,) = tokenize_examples([ex], tok, max_length=64)
    assert item["prompt_ids"] == ids(tok, "[system]Be brief\n[user]Hi\n[assistant]")
    assert item["response_ids"] == ids(tok, "4") + [tok.eos_token_id]


def test_default_template_where_the_tokenizer_has_none(tok):
    assert not getattr(tok, "chat_template", None)
    ex = Example(prompt="", target="Hello!", messages=[U])
    chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tok, ex) == ids(tok, chatml)
    # a text prompt with prompt_format=chat is one user message through the same template
    assert format_prompt(tok, "Hi", "chat") == chatml
    assert format_prompt(tok, "Hi", "plain") == "Hi"
    (item,) = tokenize_examples([ex], tok, max_length=64)
    assert item["prompt_ids"] == ids(tok, chatml) and item["response_ids"] == ids(tok, "Hello!") + [tok.eos_token_id]


def examples():
    # prompts of 3, 10 and 6 characters (= tokens with a char tokenizer)
    return [Example(prompt="abc", target="xyz", source="f.jsonl:1"),
            Example(prompt="0123456789", target="ok", source="f.jsonl:2"),
            Example(prompt="ABCDEF", target="r", source="f.jsonl:3")]


def test_long_examples_drop_counts_and_logs(tok, caplog):
    stats = {}
    with caplog.at_level(logging.WARNING):
        items = tokenize_examples(examples(), tok, max_length=8, long_examples="drop", stats=stats)
    assert [it["index"] for it in items] == [0, 2]
    assert items[1]["response_ids"] == ids(tok, "r") + [tok.eos_token_id]
    assert items[0]["response_ids"] == ids(tok, "xyz") + [tok.eos_token_id]
    assert stats["dropped"] == 1 and stats["kept"] == 2 and stats["too_long"] == 1 and stats["max_prompt_length"] == 7
    assert "1 of 3 examples have a prompt longer than 7 tokens: dropped" in caplog.text


def test_separate_prompt_limit(tok):
    stats = {}
    items = tokenize_examples(examples(), tok, max_length=8, max_prompt_length=4, long_examples="drop", stats=stats)
    assert [it["index"] for it in items] == [0] and stats["dropped"] == 2
    items = tokenize_examples(examples(), tok, max_length=8, max_prompt_length=4, long_examples="truncate",
                              stats=stats)
    assert [it["prompt_ids"] for it in items] == [ids(tok, "abc"), ids(tok, "6789"), ids(tok, "CDEF")]
    # the total limit cuts the response: 8 - 4 = 4 tokens, "ok" + EOS fits
    assert items[1]["response_ids"] == ids(tok, "ok") + [tok.eos_token_id]
    assert stats["truncated"] == 2 and stats["dropped"] == 0


def test_truncate_keeps_the_end_and_total_limit_cuts_the_response(tok):
    items = tokenize_examples(examples(), tok, max_length=8, long_examples="truncate")
    assert items[1]["prompt_ids"] == ids(tok, "3456789")  # the last 7 = max_length - 1 tokens
    assert items[1]["response_ids"] == ids(tok, "o")  # one token left of "ok" + EOS
    assert items[0]["response_ids"] == ids(tok, "xyz") + [tok.eos_token_id]


def test_long_examples_error_names_the_record(tok):
    with pytest.raises(DataError, match=r"f\.jsonl:2: prompt has 10 tokens, more than the 7 that max_length=8 allow"):
        tokenize_examples(examples(), tok, max_length=8, long_examples="error")
    with pytest.raises(DataError, match=r"f\.jsonl:3: prompt has 6 tokens.*max_prompt_length=5"):
        tokenize_examples(examples()[::2], tok, max_length=8, max_prompt_length=5, long_examples="error")


def test_data_config_validates_the_limits():
    DataConfig(task="instruct", max_length=512, max_prompt_length=256).validate()
    for bad in (0, 512, 600):
        with pytest.raises(ValueError, match="max_prompt_length"):
            DataConfig(task="instruct", max_length=512, max_prompt_length=bad).validate()
    with pytest.raises(ValueError, match="long_examples"):
        DataConfig(task="instruct", long_examples="skip").validate()
    assert DataConfig().long_examples == "drop"


def test_prepare_trains_on_chat_data_and_writes_the_drop_count(tmp_path):
    """End to end through the training entry point: a messages file with a preset model (char tokenizer,
    no chat template) is read, rendered with the default template, and the long record is dropped
    and counted in data_stats.json, written with the run's metadata."""
    from dlmdistill.config import load_config
    from dlmdistill.methods import get_method
    from dlmdistill.methods.common import prepare, write_run_metadata

    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hi " * n},
                                                  {"role": "assistant", "content": "ok"}]}) + "\n"
                         for n in (1, 2, 40)))
    cls, _ = get_method("sft")
    cfg = load_config(cls, None, ["--data.task", "chat", "--data.train_source", str(f), "--data.max_length", "64",
                                  "--model.name_or_path", "preset:tiny", "--training.output_dir", str(tmp_path / "run"),
                                  "--eval.enabled", "false"])
    prep = prepare(cfg)
    assert not (tmp_path / "run" / "data_stats.json").exists()  # nothing is written before the run starts
    write_run_metadata(cfg, prep.tokenizer, "sft")
    tok = prep.tokenizer
    assert [it["index"] for it in prep.train_items] == [0, 1]
    chatml = "<|im_start|>user\nhi <|im_end|>\n<|im_start|>assistant\n"
    assert prep.train_items[0]["prompt_ids"] == ids(tok, chatml)
    assert prep.train_items[0]["response_ids"] == ids(tok, "ok") + [tok.eos_token_id]
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["dropped"] == 1 and stats["kept"] == 2 and stats["long_examples"] == "drop"
