"""Causal-LM SFT of an autoregressive model on the same data and prompt template as the DLMs.

This builds the paper's LLM rows (the LLM teacher and the LLM student of Table 1) with the
product, and the AR teachers of the ``kd`` and ``seqkd`` baselines. The loss is the next-token
cross-entropy on response tokens only (the response ends with one EOS, which teaches the model to
stop; unlike the DLM recipes, no trailing EOS padding is trained). The model is a built-in preset
with causal attention (``preset:NAME``, see ``models.autoregressive.ar_preset_config``) or any
transformers causal LM, fully fine-tuned or with LoRA. The export in ``final/`` is an ordinary
transformers causal LM: ``dlmdistill evaluate --model RUN`` samples it left to right.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..configs.methods import ARSFTConfig, ARSFTRunConfig  # noqa: F401 (re-exported)
from ..flops import ModelShape, PassCounter
from ..losses.diffusion import masked_token_stats, token_nll
from ..models.autoregressive import CausalLM, load_causal_lm
from ..models.loading import is_preset
from ..training.trainer import Trainer
from .common import RunData, build_tokenizer, example_texts, finish, load_run_data, prepare, write_run_metadata
from .distillation import write_costs


def causal_lm_loss(model: CausalLM, batch: dict[str, torch.Tensor], normalization: str = "token"
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the response tokens of a collated batch (right padding). The first
    token of a sequence has no prefix to be predicted from; with an empty prompt (plain-text
    pretraining, the ``text`` task) it is the only response token left out."""
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"].clone()
    resp[:, 0] = False
    logits = model(ids, attn, positions=resp)
    targets = ids[resp]
    nll = token_nll(logits, targets)
    if normalization == "token":
        loss = nll.mean()
    else:
        lengths = resp.sum(dim=1, keepdim=True).clamp(min=1).expand_as(resp)[resp]
        loss = (nll / lengths).sum() / ids.shape[0]
    stats = masked_token_stats(logits.detach(), targets)
    return loss, {"token_acc": stats.get("masked_acc", 0.0), "p_true": stats.get("p_true", 0.0)}


class ARSFTTrainer(Trainer):
    method_name = "ar-sft"

    def __init__(self, *args: Any, method: ARSFTConfig | None = None, **kwargs: Any):
        self.method = method or ARSFTConfig()
        self.passes = PassCounter()
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, batch):
        b, length = batch["input_ids"].shape
        self.passes.add(b, length, int(batch["response_mask"].sum()))
        return causal_lm_loss(model, batch, self.method.normalization)

    def cost_rows(self) -> dict[str, dict[str, float]]:
        kind = "lora" if self.unwrapped.is_peft else "train"
        return {"ar-sft": {"student_training": self.passes.flops_per_micro_batch(ModelShape.of(self.unwrapped), kind)}}


def build_ar_model(cfg: Any, data: RunData | None = None) -> tuple[CausalLM, Any]:
    """The AR model of a run config; a preset's tokenizer is built from the task data (``data``, or the
    run's data loaded here) exactly as the DLM recipes build theirs (so an AR teacher and a DLM student
    trained from scratch on the same data config share a tokenizer), or reloaded from the run folder on
    resume."""
    from ..training.run_folder import prepare_output_dir

    prepare_output_dir(cfg.training)  # before a saved tokenizer is read from the folder
    tokenizer = None
    if is_preset(cfg.model):
        data = data or load_run_data(cfg)
        tokenizer = build_tokenizer(cfg.model, example_texts(data.train, data.eval), Path(cfg.training.output_dir))
    return load_causal_lm(cfg.model, tokenizer)


def run(cfg: Any) -> dict[str, float]:
    """Train an autoregressive model with causal-LM SFT; returns the final evaluation metrics."""
    data = load_run_data(cfg)
    model, tokenizer = build_ar_model(cfg, data)
    prep = prepare(cfg, model=model, tokenizer=tokenizer, data=data)
    collator = dataclasses.replace(prep.collator, pad_response_with_eos=False, response_length=None)
    trainer = ARSFTTrainer(model, tokenizer, prep.train_items, cfg.training, collate_fn=collator,
                           evaluator=prep.evaluator, run_config=cfg, method=cfg.method)
    write_run_metadata(cfg, tokenizer, ARSFTTrainer.method_name, trainer.accelerator)
    metrics = trainer.train()
    write_costs(trainer, trainer.cost_rows())
    return finish(trainer, metrics)
