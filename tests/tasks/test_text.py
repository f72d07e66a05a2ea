import pytest

from dlmdistill.tasks.io import DataError
from dlmdistill.tasks.registry import get_task


def test_text_records_become_unconditional_examples(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Count", "input": "1 2", "output": "3"}\n')
    task = get_task("text", fields=["instruction", "input", "output"])
    ex = task.load(str(f))
    assert [e.prompt for e in ex] == ["", ""]
    assert ex[0].target == "Say hi\n\nhi" and ex[1].target == "Count\n\n1 2\n\n3"
    assert len(task.load(str(f), limit=1)) == 1


def test_text_missing_fields_name_the_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2.*'text'"):
        get_task("text").load(str(f))
