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
    # one position left for "ok" + EOS: the answer is cut and keeps its EOS (the model learns to stop)
    assert items[1]["response_ids"] == [tok.eos_token_id]
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


# ------------------------------------------------------------------------------------ over-long answers
def long_answers():
    # prompt + answer + EOS: 3 + 2 + 1 = 6 fits in 8; 3 + 10 + 1 = 14 leaves 5 for the answer; 6 + 3 + 1 = 10 leaves 2
    return [Example(prompt="abc", target="xy", source="f.jsonl:1"),
            Example(prompt="abc", target="0123456789", source="f.jsonl:2"),
            Example(prompt="ABCDEF", target="rst", source="f.jsonl:3")]


def test_long_answers_are_dropped_counted_and_logged(tok, caplog):
    stats = {}
    with caplog.at_level(logging.WARNING):
        items = tokenize_examples(long_answers(), tok, max_length=8, long_examples="drop", stats=stats)
    assert [it["index"] for it in items] == [0]
    assert stats["responses_too_long"] == 2 and stats["responses_dropped"] == 2 and stats["dropped"] == 2
    assert stats["kept"] == 1 and stats["responses_truncated"] == 0 and stats["longest_response"] == 11
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "2 of 3 answers do not fit" in warnings[0] and "max_length=8" in warnings[0]
    assert "the longest: 11 tokens with its EOS, where 5 fit" in warnings[0] and "dropped" in warnings[0]


def test_truncated_answers_keep_their_eos_and_are_counted(tok, caplog):
    stats = {}
    with caplog.at_level(logging.WARNING):
        items = tokenize_examples(long_answers(), tok, max_length=8, long_examples="truncate", stats=stats)
    eos = tok.eos_token_id
    assert [it["response_ids"] for it in items] == [ids(tok, "xy") + [eos], ids(tok, "0123") + [eos],
                                                    ids(tok, "r") + [eos]]
    assert all(len(it["prompt_ids"]) + len(it["response_ids"]) <= 8 for it in items)
    assert stats["responses_truncated"] == 2 and stats["truncated"] == 2 and stats["dropped"] == 0
    assert stats["kept"] == 3 and stats["truncated_response_eos"] == "kept"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 of 3 answers do not fit" in warning and "the longest: 11 tokens with its EOS, where 5 fit" in warning
    assert "EOS kept as the last token" in warning


def test_long_answers_can_be_cut_while_long_prompts_are_dropped(tok, caplog):
    # the Dolly configs: long_examples drop (prompts), long_answers truncate
    examples = [*long_answers(), Example(prompt="p" * 9, target="ok", source="f.jsonl:4")]
    stats = {}
    with caplog.at_level(logging.WARNING):
        items = tokenize_examples(examples, tok, max_length=8, long_examples="drop", long_answers="truncate",
                                  stats=stats)
    eos = tok.eos_token_id
    assert [it["response_ids"] for it in items] == [ids(tok, "xy") + [eos], ids(tok, "0123") + [eos],
                                                    ids(tok, "r") + [eos]]  # the 9-token prompt is dropped
    assert stats["prompts_dropped"] == 1 and stats["responses_truncated"] == 2 and stats["responses_dropped"] == 0
    assert stats["long_examples"] == "drop" and stats["long_answers"] == "truncate"
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "(data.long_examples=drop)" in warnings and "(data.long_answers=truncate)" in warnings
    with pytest.raises(DataError, match="set data.long_answers to drop or truncate"):
        tokenize_examples(long_answers(), tok, max_length=8, long_examples="drop", long_answers="error")


def test_long_answer_error_names_the_record(tok):
    with pytest.raises(DataError, match=r"f\.jsonl:2: answer has 11 tokens with its EOS, more than the 5 that "
                                        r"max_length=8 leaves after its 3-token prompt"):
        tokenize_examples(long_answers(), tok, max_length=8, long_examples="error")


def test_response_length_limits_answers_at_tokenization(tok):
    stats = {}
    items = tokenize_examples(long_answers(), tok, max_length=64, max_response_length=4, long_examples="truncate",
                              stats=stats)
    eos = tok.eos_token_id
    assert [it["response_ids"] for it in items] == [ids(tok, "xy") + [eos], ids(tok, "012") + [eos],
                                                    ids(tok, "rst") + [eos]]
    assert stats["responses_truncated"] == 1 and stats["max_response_length"] == 4


def test_everything_dropped_is_an_error(tok):
    with pytest.raises(DataError, match=r"all 2 training examples were dropped.*max_length=6"):
        tokenize_examples(long_answers()[1:], tok, max_length=6, long_examples="drop")


def test_collator_response_length_reports_what_it_cuts(caplog):
    from dlmdistill.data import DiffusionCollator

    eos = 2
    collate = DiffusionCollator(pad_id=0, eos_id=eos, response_length=3)
    items = [{"prompt_ids": [1], "response_ids": [5, 6, 7, 8, eos]}, {"prompt_ids": [1], "response_ids": [5, eos]}]
    with caplog.at_level(logging.WARNING):
        batch = collate(items)
        collate(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6, eos], [1, 5, eos, eos]]  # the cut answer ends with EOS
    assert collate.stats == {"responses": 4, "responses_truncated": 2, "longest_response": 5, "response_length": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per collator; the counts go on in collate.stats
    assert "1 of 2 answers" in warnings[0] and "response_length=3" in warnings[0]
    assert "the longest: 5 tokens" in warnings[0]


def chat_file(path, n, answer="ok"):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for i in range(n)))
    return path


def run_config(tmp_path, *args):
    from dlmdistill.config import load_config
    from dlmdistill.methods import get_method

    cls, _ = get_method("sft")
    return load_config(cls, None, ["--model.name_or_path", "preset:tiny", "--training.output_dir",
                                   str(tmp_path / "run"), *args])


def test_prepare_counts_truncated_answers_in_data_stats(tmp_path, caplog):
    from dlmdistill.methods.common import prepare, write_run_metadata

    f = chat_file(tmp_path / "chat.jsonl", 4, answer="a long answer " * 8)
    cfg = run_config(tmp_path, "--data.task", "chat", "--data.train_source", str(f), "--data.max_length", "64",
                     "--data.long_examples", "truncate", "--eval.enabled", "false")
    with caplog.at_level(logging.WARNING):
        prep = prepare(cfg)
    write_run_metadata(cfg, prep.tokenizer, "sft")
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["responses_truncated"] == 4 and stats["truncated"] == 4 and stats["kept"] == 4
    assert all(it["response_ids"][-1] == prep.tokenizer.eos_token_id for it in prep.train_items)
    assert "4 of 4 answers do not fit" in caplog.text


# ------------------------------------------------------------------------------------ own data: task and evaluation
FORMATS = {
    "messages": ({"messages": [{"role": "user", "content": "q{i}"}, {"role": "assistant", "content": "a{i}"}]},
                 "instruct"),
    "prompt_completion": ({"prompt": "q{i}", "completion": "a{i}"}, "instruct"),
    "alpaca": ({"instruction": "q{i}", "input": "", "output": "a{i}"}, "instruct"),
    "text": ({"text": "t{i}"}, "text"),
}


def format_file(path, fmt, n):
    template = json.dumps(FORMATS[fmt][0])
    path.write_text("".join(template.replace("{i}", str(i)) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_task_is_detected_from_the_records(tmp_path, caplog, fmt):
    from dlmdistill.methods.common import prepare

    f = format_file(tmp_path / "data.jsonl", fmt, 20)
    cfg = run_config(tmp_path, "--data.train_source", str(f))
    assert cfg.data.task is None
    with caplog.at_level(logging.INFO):
        prep = prepare(cfg)
    assert cfg.data.task == FORMATS[fmt][1]
    assert f"{f}: data.task not given: the records are {fmt!r} data, so the task is {FORMATS[fmt][1]!r}" in caplog.text
    if fmt == "text":  # no metric: trained without evaluation, with one notice
        assert prep.evaluator is None and len(prep.train_items) == 20
        assert caplog.text.count("no evaluation during training") == 1
    else:  # evaluated on a held-out slice of the training file: 10% of 20 records
        assert len(prep.eval_examples) == 2 and len(prep.train_items) == 18
        assert "holding out 2 of the 20 training records" in caplog.text


def test_holdout_never_puts_a_record_on_both_sides(tmp_path):
    """Every assistant turn of a conversation is an example (turns: all), and two records are the same
    conversation: whatever lands in the held-out slice, no record, nor a copy of it, is also trained on."""
    from dlmdistill.methods.common import prepare, write_run_metadata

    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                             {"role": "user", "content": f"r{i}"}, {"role": "assistant", "content": f"b{i}"}]}
               for i in range(30)]
    records.append(records[0])
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    removed = []
    for seed in range(6):
        cfg = run_config(tmp_path, "--data.train_source", str(f), "--task_kwargs", "{turns: all}", "--data.seed",
                         str(seed), "--eval.holdout_size", "5", "--overwrite_output_dir")
        prep = prepare(cfg)
        write_run_metadata(cfg, prep.tokenizer, "sft")
        record = lambda ex: ex.source.split(" turn ")[0]  # noqa: E731
        content = lambda ex: (ex.prompt, ex.target)  # noqa: E731
        assert {record(e) for e in prep.eval_examples}.isdisjoint(record(e) for e in prep.train_examples)
        assert {content(e) for e in prep.eval_examples}.isdisjoint(content(e) for e in prep.train_examples)
        assert len({record(e) for e in prep.eval_examples}) == 5
        stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())["evaluation"]
        assert stats["held_out_records"] == 5 and stats["records"] == 31
        assert len(prep.train_examples) == 2 * (31 - 5) - stats["duplicates_removed"]  # examples, 2 a record
        removed.append(stats["duplicates_removed"])
    assert 2 in removed  # some seed held out one copy of the repeated record: the other was not trained on


def test_eval_when_missing_skip_gives_one_notice(tmp_path, caplog):
    from dlmdistill.methods.common import prepare

    f = chat_file(tmp_path / "chat.jsonl", 10)
    cfg = run_config(tmp_path, "--data.train_source", str(f), "--eval.when_missing", "skip")
    with caplog.at_level(logging.INFO):
        prep = prepare(cfg)
    assert prep.evaluator is None and len(prep.train_items) == 10
    assert caplog.text.count("no evaluation during training") == 1 and "eval.when_missing=skip" in caplog.text


def test_an_eval_source_is_used_as_it_is(tmp_path):
    from dlmdistill.methods.common import prepare

    f, g = chat_file(tmp_path / "chat.jsonl", 10), chat_file(tmp_path / "test.jsonl", 3)
    prep = prepare(run_config(tmp_path, "--data.train_source", str(f), "--data.eval_source", str(g)))
    assert len(prep.train_items) == 10 and len(prep.eval_examples) == 3
