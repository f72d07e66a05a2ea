from dlmdistill.tasks.base import clean_completion, extract_answer, last_line, strip_tags


def test_clean_completion_cuts_at_the_end_token():
    text = "<reasoning>x</reasoning>\n<answer>\n18\n</answer><|eot_id|><|endoftext|><|endoftext|>"
    assert clean_completion(text) == "<reasoning>x</reasoning>\n<answer>\n18\n</answer>"
    assert clean_completion("a<|start_header_id|>b") == "ab"
    assert clean_completion("<answer>5</answer><|endoftext|>junk 7") == "<answer>5</answer>"


def test_extract_answer_drops_a_cut_off_closing_tag():
    assert extract_answer("<answer>\n18\n</answ") == "18"
    assert extract_answer("<answer>\n18\n</") == "18"
    assert extract_answer("<answer>a < b") == "a < b"
    assert extract_answer("<answer>18</answer> trailing </") == "18"
    assert extract_answer("no tags") is None


def test_untagged_fallback_ignores_tags():
    assert last_line("reasoning\n</reasoning>\n</answer>\n(30 + 93) - 100\n</") == "(30 + 93) - 100"
    assert last_line("reasoning\n(30 + 93) - 100</answer>") == "(30 + 93) - 100"
    assert last_line("</answer>\n</") is None
    assert strip_tags("a<answer>b</answer>c").splitlines() == ["a", "b", "c"]
