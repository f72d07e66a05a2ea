import json
from dataclasses import replace

import pytest

from dlmdistill.data import DataError, DiffusionCollator, tokenize_examples
from dlmdistill.flops import ModelShape
from dlmdistill.methods.seqkd import SeqKDTrainer, generate_teacher_responses, read_responses
from dlmdistill.methods.sft import SFTConfig
from dlmdistill.sampling import GenerationConfig
from dlmdistill.tasks.base import Example
from dlmdistill.training import TrainingConfig
from tests.conftest import tiny_model
from tests.models.test_autoregressive import tiny_ar


PROMPTS = [f"{w}=" for w in ("abc", "bca", "cab", "aab", "bba")]


@pytest.mark.parametrize("kind", ["dlm", "ar"])
def test_teacher_responses_are_written_reused_and_resumed(tokenizer, tmp_path, kind):
    teacher = tiny_model(tokenizer, seed=1)[0] if kind == "dlm" else tiny_ar(tokenizer, seed=1)
    gen = GenerationConfig(gen_length=4, steps=4, batch_size=2)
    path = tmp_path / "seqkd_data.jsonl"
    first = generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, path, chunk_size=2)
    assert len(first) == 5 and read_responses(path, PROMPTS) == first
    # a run interrupted in the middle of the last chunk: the torn chunk is regenerated identically
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4] + ['{"index": 4, "pro']) + "\n")
    again = generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, path, chunk_size=2)
    assert again == first and path.read_text().splitlines() == lines
    with pytest.raises(DataError, match="different prompt list"):
        read_responses(path, ["other"] + PROMPTS[1:])


def test_sft_on_teacher_responses_runs(tokenizer, tmp_path):
    teacher, _ = tiny_model(tokenizer, seed=1)
    gen = GenerationConfig(gen_length=4, steps=4)
    responses = generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, tmp_path / "d.jsonl")
    examples = [Example(prompt=p, target=r) for p, r in zip(PROMPTS, responses)]
    items = tokenize_examples(examples, tokenizer, max_length=32)
    student, tok = tiny_model(tokenizer, seed=0)
    cfg = TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         progress_bar=False, report_to=["jsonl"], export_final=False)
    trainer = SeqKDTrainer(student.train(), tok, items, cfg, method=SFTConfig(),
                           collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
    trainer.train()
    assert trainer.state.global_step == 3
    rows = trainer.cost_rows(ModelShape.of(teacher), teacher_is_ar=False)
    assert rows["seqkd"]["teacher_training"] > 0
    assert rows["seqkd"]["student_training"] == rows["sft"]["student_training"]


def test_answers_of_other_settings_are_refused_not_reused(tokenizer, tmp_path):
    teacher = tiny_model(tokenizer, seed=1)[0]
    gen = GenerationConfig(gen_length=4, steps=4, batch_size=2)
    path = tmp_path / "seqkd_data.jsonl"
    first = generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, path, source={"teacher": "a"})
    assert json.loads((tmp_path / "seqkd_data.json").read_text())["teacher"] == "a"
    # the same settings reuse the answers (a resumed run); the teacher is not asked again
    assert generate_teacher_responses(None, tokenizer, PROMPTS, gen, path, source={"teacher": "a"}) == first
    with pytest.raises(DataError, match=r"teacher: 'a' there, 'b' now"):
        generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, path, source={"teacher": "b"})
    with pytest.raises(DataError, match=r"generation: .*'steps': 4.* there, .*'steps': 2"):
        generate_teacher_responses(teacher, tokenizer, PROMPTS, replace(gen, steps=2), path, source={"teacher": "a"})
    with pytest.raises(DataError, match="seed: 0 there, 1 now"):
        generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, path, seed=1, source={"teacher": "a"})
    assert read_responses(path, PROMPTS) == first  # a refused run leaves the answers as they were
    (tmp_path / "seqkd_data.json").unlink()  # answers from before the record existed: refused too
    with pytest.raises(DataError, match="without a record of the teacher"):
        generate_teacher_responses(teacher, tokenizer, PROMPTS, gen, path, source={"teacher": "a"})


def test_overwrite_output_dir_deletes_the_teacher_answers(tmp_path):
    from dlmdistill.training.run_folder import prepare_output_dir

    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final_metrics.json").write_text("{}")
    for name in ("seqkd_data.jsonl", "seqkd_data.json"):
        (out / name).write_text("old teacher\n")
    prepare_output_dir(TrainingConfig(output_dir=str(out), overwrite_output_dir=True))
    assert not (out / "seqkd_data.jsonl").exists() and not (out / "seqkd_data.json").exists()
