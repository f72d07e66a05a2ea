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


def test_after_an_empty_answer_block():
    from dlmdistill.tasks.base import after_answer

    assert after_answer("no tags 18") == "no tags 18"
    assert after_answer("<reasoning>9 eggs</reasoning><answer></answer> 18") == " 18"
    assert after_answer("<reasoning>9 eggs</reasoning><answer>") == ""


def test_an_empty_answer_block_does_not_make_the_reasoning_the_answer():
    from dlmdistill.tasks.base import Example
    from dlmdistill.tasks.countdown import CountdownTask
    from dlmdistill.tasks.gsm8k import GSM8KTask
    from dlmdistill.tasks.math500 import Math500Task

    cd = Example(prompt="", meta={"numbers": [30, 100, 93], "target": 23})
    assert CountdownTask().score(cd, "(30+93)-100\n</reasoning>\n<answer>\n</answer>") == 0.0
    assert CountdownTask().score(cd, "<answer>\n</answer>\n(30+93)-100") == 1.0
    gsm = Example(prompt="", meta={"answer": "18"})
    assert GSM8KTask().score(gsm, "9 * 2 = 18\n</reasoning>\n<answer>\n</answer>") == 0.0
    assert GSM8KTask().score(gsm, "\\boxed{18}\n</reasoning>\n<answer></answer>") == 0.0
    assert GSM8KTask().score(gsm, "<answer></answer>\\boxed{18}") == 1.0
    math = Example(prompt="", meta={"answer": "3"})
    assert Math500Task().score(math, "\\boxed{3}</reasoning><answer> </answer>") == 0.0
