"""LLaDA's public sampling loop, re-implemented operation by operation: the oracle of
``tests/test_sampling.py`` and the baseline of ``benchmarks/bench_foundation.py``.

Source: https://github.com/ML-GSAI/LLaDA, ``generate.py`` (``add_gumbel_noise``,
``get_num_transfer_tokens``, ``generate``), as of commit 41760b9; the CUDA/CPU path (float64), not
the float32 one for Apple MPS. It shares nothing with ``dlmdistill.sampling`` on purpose, so that a
comparison of the two can fail. The only additions are hooks that leave the computation unchanged
when not used:

* ``rand_like`` / ``rand``: the two random draws (the Gumbel uniforms over ``[B, L, V]`` at every
  step, and the float32 ``[B, L]`` scores of ``random`` remasking); default: torch's functions on
  the global generator, as in LLaDA;
* ``record``: a list that receives a copy of ``x`` before each step.

``llada_generate`` runs it on a ``dlmdistill`` model with the fields of a ``GenerationConfig``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F


def add_gumbel_noise(logits, temperature, rand_like=torch.rand_like):
    """Gumbel-max in float64: argmax of the result samples softmax(logits / temperature). At
    temperature 0 the noise is drawn and raised to the power 0, i.e. the result is exp(logits)."""
    logits = logits.to(torch.float64)
    noise = rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index, steps):
    """Tokens to unmask at each step: the masked count of each row split evenly, remainder first."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        counts[i, :remainder[i]] += 1
    return counts


@torch.no_grad()
def generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence", mask_id=126336, *, rand_like=torch.rand_like, rand=torch.rand, record=None):
    """LLaDA's ``generate``: ``model(x).logits`` gives [B, L, V]; ``prompt`` is [B, P] without padding."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long).to(model.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        end = prompt.shape[1] + (num_block + 1) * block_length
        block_mask_index = x[:, start:end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            if record is not None:
                record.append(x.clone())
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x], dim=0)).logits
                logits, un_logits = torch.chunk(both, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits

            logits_with_noise = add_gumbel_noise(logits, temperature, rand_like)
            x0 = torch.argmax(logits_with_noise, dim=-1)

            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


class _AsLLaDA:
    """Presents a dlmdistill model (or any ``forward(input_ids) -> [B, L, V]``) as LLaDA's
    ``model``: ``model(x).logits`` and ``model.device``."""

    def __init__(self, forward, device):
        self.forward, self.device = forward, device

    def __call__(self, x):
        return SimpleNamespace(logits=self.forward(x))


def llada_generate(model, prompt: torch.Tensor, config, *, forward=None, **hooks) -> torch.Tensor:
    """LLaDA's ``generate`` on a ``DiffusionModel`` with the settings of a ``GenerationConfig``
    (``forward`` replaces the model's own logits function); ``hooks``: ``rand_like``, ``rand``,
    ``record``. Returns the final ``x`` [B, P + G]."""
    return generate(_AsLLaDA(forward or model, model.device), prompt, steps=config.steps,
                    gen_length=config.gen_length, block_length=config.block_length or config.gen_length,
                    temperature=config.temperature, cfg_scale=config.cfg_scale, remasking=config.remasking,
                    mask_id=model.mask_id, **hooks)
