import copy
import json

import pytest
import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.diffusion import forward_process
from dlmdistill.methods.distillation import check_same_tokenizer, write_costs
from dlmdistill.methods.kd import KDConfig, KDTrainer, eos_padding, teacher_logits
from dlmdistill.models.tokenizer import char_tokenizer
from dlmdistill.training import TrainingConfig
from tests.conftest import tiny_model
from tests.methods.test_sft import reverse_items
from tests.models.test_autoregressive import tiny_ar



def _tl(teacher, ids, masked, mask_id):
    """Teacher rows for a student input with ``masked`` replaced by the mask id."""
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return teacher_logits(teacher, ids, noisy, torch.ones_like(ids), masked)


def test_ar_teacher_row_for_position_i_depends_only_on_the_clean_prefix(tokenizer):
    teacher = tiny_ar(tokenizer)
    mask_id = tokenizer.mask_token_id
    ids = torch.randint(5, 30, (1, 12), generator=torch.Generator().manual_seed(0))
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, 6] = True  # the student's masked position i = 6
    ref = _tl(teacher, ids, masked, mask_id)
    assert ref.shape == (1, teacher.hf_model.config.vocab_size)  # one row per masked position

    later = ids.clone()
    later[0, 6:] = (later[0, 6:] - 5 + 3) % 25 + 5  # change y_i and everything after it
    other_mask = masked.clone()
    other_mask[0, 9] = True  # and mask more positions after i in the student's input
    same = _tl(teacher, later, other_mask, mask_id)[:1]
    torch.testing.assert_close(same, ref)

    earlier = ids.clone()
    earlier[0, 5] = (earlier[0, 5] - 5 + 3) % 25 + 5  # change y_{i-1}
    assert (_tl(teacher, earlier, masked, mask_id) - ref).abs().max() > 1e-4
    # and the row equals the causal LM's own next-token logits at i - 1
    with torch.no_grad():
        torch.testing.assert_close(ref[0], teacher.hf_model(input_ids=ids).logits[0, 5])


def test_dlm_teacher_reads_the_students_noisy_input(tokenizer):
    teacher, _ = tiny_model(tokenizer, seed=1)
    ids = torch.randint(5, 30, (2, 10))
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 4:] = True
    noised = forward_process(ids, resp, teacher.mask_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(noised.noisy_ids, torch.ones_like(ids), positions=noised.masked)
    got = teacher_logits(teacher, ids, noised.noisy_ids, torch.ones_like(ids), noised.masked)
    torch.testing.assert_close(got, want)


def test_tokenizer_check_names_both_tokenizers_and_allows_extra_student_tokens(tokenizer):
    other = char_tokenizer(["xyz"])
    with pytest.raises(ValueError, match=r"student tokenizer \(stu-tok.*teacher tokenizer \(tea-tok"):
        check_same_tokenizer(tokenizer, other, "stu-tok", "tea-tok")
    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens(["<extra>"])
    check_same_tokenizer(bigger, tokenizer, "student", "teacher")


def make_kd(tokenizer, out, teacher, steps=6, **method):
    model, tok = tiny_model(tokenizer, seed=0)
    cfg = TrainingConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
                         logging_steps=1, progress_bar=False, report_to=["jsonl"], export_final=False)
    return KDTrainer(model.train(), tok, reverse_items(tok, 64), cfg, teacher=teacher,
                     method=KDConfig(teacher="(test)", **method),
                     collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))


def test_kd_with_an_identical_dlm_teacher_has_zero_kd_loss(tokenizer, tmp_path):
    student, _ = tiny_model(tokenizer, seed=0)
    trainer = make_kd(tokenizer, tmp_path, copy.deepcopy(student), steps=1)
    trainer.train()
    log = json.loads(open(tmp_path / "logs.jsonl").readline())
    assert log["loss/kd"] < 1e-6 and log["kd/top1_agreement"] == 1.0
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


@pytest.mark.parametrize("kind", ["dlm", "ar"])
def test_kd_runs_a_few_steps_and_accounts_costs(tokenizer, tmp_path, kind):
    teacher = tiny_model(tokenizer, seed=1)[0] if kind == "dlm" else tiny_ar(tokenizer, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_kd(tokenizer, tmp_path, teacher, divergence="reverse_kl" if kind == "ar" else "forward_kl",
                      temperature=2.0)
    trainer.train()
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert len(logs) == 6 and all(l["loss/kd"] > 0 for l in logs)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])  # the teacher stays frozen
    table = write_costs(trainer, trainer.cost_rows())
    rows = table["rows"]
    assert rows["kd"]["per_iteration"]["student_training"] > rows["sft"]["per_iteration"]["total"]
    assert rows["kd"]["per_iteration"]["teacher_training"] > 0
    assert (tmp_path / "flops.json").exists()


def test_eos_padding_is_everything_after_the_first_response_eos():
    eos = 1
    ids = torch.tensor([[9, 9, 5, 1, 1, 1], [9, 5, 6, 7, 1, 0]])
    resp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert eos_padding(ids, resp, eos).tolist() == [[False, False, False, False, True, True], [False] * 6]
