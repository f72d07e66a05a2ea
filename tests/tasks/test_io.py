import json
import re
import sys
import types

import pytest

from dlmdistill.tasks.io import DataError, first_field, read_records, require


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_records_carry_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    records = read_records(f)
    assert records == [({"a": 1}, f"{f}:1"), ({"a": 2}, f"{f}:3")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match=re.escape(f"{f}:3: malformed JSON line")):
        read_records(f)


def test_non_object_jsonl_line_is_an_error(tmp_path):
    f = write(tmp_path / "list.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:1: expected a JSON object")):
        read_records(f)


def test_require_names_file_line_and_field(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    (ok, ok_src), (bad, bad_src) = read_records(f)
    assert require(ok, "answer", ok_src) == "#### 1"
    with pytest.raises(DataError) as err:
        require(bad, "answer", bad_src)
    assert f"{f}:2" in str(err.value) and "'answer'" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_first_field_takes_the_first_present_alias():
    assert first_field({"context": "c"}, ("input", "context"), "x:1") == "c"
    with pytest.raises(DataError, match="x:1: missing required field 'input' or 'context'"):
        first_field({}, ("input", "context"), "x:1")


def test_json_list(tmp_path):
    f = write(tmp_path / "d.json", json.dumps([{"a": 1}, {"a": 2}]))
    assert read_records(f) == [({"a": 1}, f"{f}[0]"), ({"a": 2}, f"{f}[1]")]
    g = write(tmp_path / "obj.json", '{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        read_records(g)


def test_csv_rows_and_malformed_row(tmp_path):
    f = write(tmp_path / "d.csv", "Puzzle,Solution\n12,34\n56,78\n")
    assert read_records(f) == [({"Puzzle": "12", "Solution": "34"}, f"{f}:2"),
                               ({"Puzzle": "56", "Solution": "78"}, f"{f}:3")]
    g = write(tmp_path / "bad.csv", "Puzzle,Solution\n12,34\n56\n")
    with pytest.raises(DataError, match=re.escape(f"{g}:3: malformed CSV row (1 fields, header has 2)")):
        read_records(g)


def test_folder_picks_split_file(tmp_path):
    write(tmp_path / "valid.jsonl", '{"s": "valid"}\n')
    write(tmp_path / "train.jsonl", '{"s": "train"}\n')
    assert read_records(tmp_path, "test")[0][0] == {"s": "valid"}
    assert read_records(tmp_path, "train")[0][0] == {"s": "train"}
    with pytest.raises(DataError, match="cannot pick a data file"):
        read_records(tmp_path, None)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "absent.jsonl")


def test_unknown_name_goes_to_hf_datasets(monkeypatch):
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"question": "q", "answer": "#### 4"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records = read_records("openai/gsm8k:main", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert records == [({"question": "q", "answer": "#### 4"}, "openai/gsm8k:main:test[0]")]


def test_hf_failure_is_a_data_error(monkeypatch):
    def load_dataset(repo, config, split):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="some/dataset: not a local path.*ConnectionError: offline"):
        read_records("some/dataset")
