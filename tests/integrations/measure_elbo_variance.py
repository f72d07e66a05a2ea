"""Spread of the Monte-Carlo log-likelihood estimate (docs/evaluation.md, variance table).

    PYTHONPATH=src OMP_NUM_THREADS=1 python tests/integrations/measure_elbo_variance.py

Model: the test suite's tiny model (hidden 32, character tokenizer, seed 0), first trained for 400
steps with the masked-diffusion loss on counting lines ``count: 3 4 5 6 7 8 9``, so that its
predictions depend on the context. For the context ``count: 3`` and a right and a wrong
continuation of 4 and 12 characters, the estimate is repeated 20 times with different seeds at each
mc_num; the table gives the mean and the standard deviation over the repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dlmdistill.integrations.lm_eval import elbo_loglikelihood  # noqa: E402
from dlmdistill.models import char_tokenizer  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

torch.set_num_threads(1)
tok = char_tokenizer(["0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:?\n"])
model, tok = tiny_model(tok)

# ---- a short masked-diffusion training run (the loss of docs/methods/sft.md, all tokens after "count:")
lines = [("count: " + " ".join(str(a + i) for i in range(7)))[:20] for a in range(10)]
ids = torch.tensor([tok(s, add_special_tokens=False).input_ids for s in lines])
g = torch.Generator().manual_seed(0)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
model.train()
t0 = time.perf_counter()
for step in range(400):
    batch = ids[torch.randint(0, len(ids), (32,), generator=g)]
    r = torch.zeros_like(batch, dtype=torch.bool)
    r[:, 6:] = True
    t = torch.rand(len(batch), generator=g) * 0.999 + 0.001
    masked = (torch.rand(batch.shape, generator=g) < t[:, None]) & r
    noisy = torch.where(masked, torch.full_like(batch, model.mask_id), batch)
    logits = model(noisy, None, positions=masked)
    ce = torch.nn.functional.cross_entropy(logits, batch[masked], reduction="none")
    loss = (ce / t[:, None].expand_as(masked)[masked]).sum() / r.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
print(f"trained 400 steps in {time.perf_counter() - t0:.0f} s, last loss {loss.item():.3f}\n")

ctx = tok("count: 3", add_special_tokens=False).input_ids
conts = {" 4 5": " 4 5", " 9 1": " 9 1", " 4 5 6 7 8 9": " 4 5 6 7 8 9", " 9 1 5 2 8 0": " 9 1 5 2 8 0"}
print("| continuation | tokens | mc_num | mean | std over 20 repeats | ms per estimate |")
print("|---|---|---|---|---|---|")
for name, text in conts.items():
    cont = tok(text, add_special_tokens=False).input_ids
    for mc in [1, 8, 32, 128]:
        vals = []
        t0 = time.perf_counter()
        for rep in range(20):
            gen = torch.Generator().manual_seed(1000 + rep)
            vals.append(elbo_loglikelihood(model, ctx, cont, mc_num=mc, batch_size=32, generator=gen))
        dt = (time.perf_counter() - t0) / 20 * 1000
        print(f"| `{name}` | {len(cont)} | {mc} | {statistics.mean(vals):.2f} | {statistics.stdev(vals):.3f} | {dt:.0f} |")
