import json

import torch

from dlmdistill.data import DiffusionCollator
from dlmdistill.methods.ar_sft import ARSFTConfig, ARSFTTrainer, causal_lm_loss
from dlmdistill.models import ModelConfig
from dlmdistill.models.autoregressive import CausalLM, load_for_inference
from dlmdistill.training import TrainingConfig
from tests.methods.test_sft import reverse_items
from tests.models.test_autoregressive import tiny_ar



def test_loss_covers_response_tokens_only_with_both_normalisations(tokenizer):
    model = tiny_ar(tokenizer)
    items = reverse_items(tokenizer, 4)
    items[0]["response_ids"] = items[0]["response_ids"][:2]  # unequal lengths -> right padding
    batch = DiffusionCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, pad_response_with_eos=False)(items)
    resp = batch["response_mask"]
    with torch.no_grad():
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                                reduction="none")
        nll = torch.where(resp[:, 1:], nll, torch.zeros_like(nll))
        token, _ = causal_lm_loss(model, batch, "token")
        sequence, _ = causal_lm_loss(model, batch, "sequence")
    torch.testing.assert_close(token, nll.sum() / resp.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sequence, (nll.sum(1) / resp.sum(1)).mean(), rtol=1e-4, atol=1e-5)


def test_ar_sft_trains_exports_a_causal_lm_and_reloads(tokenizer, tmp_path):
    model = tiny_ar(tokenizer).train()
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=32, learning_rate=3e-3,
                         warmup_ratio=0.0, logging_steps=5, progress_bar=False, report_to=["jsonl"])
    collate = DiffusionCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, pad_response_with_eos=False)
    trainer = ARSFTTrainer(model, tokenizer, reverse_items(tokenizer), cfg, method=ARSFTConfig(), collate_fn=collate)
    trainer.train()
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"] and logs[-1]["token_acc"] > logs[0]["token_acc"]
    loaded, _ = load_for_inference(ModelConfig(name_or_path=str(tmp_path / "final")))
    assert isinstance(loaded, CausalLM)
    assert trainer.cost_rows()["ar-sft"]["student_training"] > 0
