"""Device-to-host reads per optimizer step, counted with ``torch.profiler`` on the CPU (issue 26).

On a GPU every ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``) and every ``aten::nonzero``
(boolean indexing, data-dependent shapes) waits for the device to drain its queue. The oracle is the
profiler's own op count, recorded around each ``training_step``; reads inside ``Optimizer.step`` are counted
apart: AdamW keeps its step counters on the host unless ``capturable``/``fused``, so on a GPU they are host
reads that wait for nothing.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dlmdistill.data import DiffusionCollator
from dlmdistill.methods.selffusion import SelfFusionTrainer
from dlmdistill.methods.sft import SFTTrainer
from dlmdistill.training import TrainingConfig
from tests.conftest import tiny_model
from tests.methods.test_sft import reverse_items

READS = ("aten::_local_scalar_dense", "aten::nonzero")


def reads_in(scope: str, run, excluding: tuple[str, ...] = ()) -> tuple[int, dict[str, int]]:
    """Run ``run()`` under the profiler: (number of ``scope`` blocks, the reads inside them by op, those of
    ``Optimizer.step`` and of the scopes ``excluding`` left out)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    blocks, counts = 0, collections.Counter()
    for e in prof.events():
        if e.name == scope:
            blocks += 1
        if e.name not in READS:
            continue
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if scope in chain and not any(n.startswith("Optimizer.step") or n in excluding for n in chain):
            counts[e.name] += 1
    return blocks, dict(counts)


def count_reads(trainer, steps: int) -> dict[tuple[str, str], float]:
    """Reads per optimizer step inside ``training_step`` (train ``steps`` steps): {(op, "step"): count / steps}."""
    inner = trainer.training_step

    def wrapped(batch):
        with record_function("TRAINING_STEP"):
            return inner(batch)

    trainer.training_step = wrapped
    _, counts = reads_in("TRAINING_STEP", trainer.train)
    return {(op, "step"): n / steps for op, n in counts.items()}


def make(cls, tokenizer, out, steps, **kw):
    model, tok = tiny_model(tokenizer, seed=0)
    kw = {"logging_steps": 1000, **kw}
    cfg = TrainingConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3,
                         save_steps=0, progress_bar=False, report_to=["none"], export_final=False, **kw)
    return cls(model.train(), tok, reverse_items(tok, n=64), cfg,
               collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))


def test_static_sft_step_reads_the_device_once(tokenizer, tmp_path):
    steps = 5
    reads = count_reads(make(SFTTrainer, tokenizer, tmp_path, steps, static_shapes=True), steps)
    # the update's finiteness check (loss and gradient norm together); no data-dependent shape anywhere
    assert reads.get(("aten::_local_scalar_dense", "step"), 0) <= 1
    assert reads.get(("aten::nonzero", "step"), 0) == 0


def test_default_steps_read_the_device_a_bounded_number_of_times(tokenizer, tmp_path):
    """Without static shapes the masked-position selection costs its nonzero calls (SFT: the model's
    selection, the targets and the weights); metrics no longer cost a read each."""
    steps = 5
    sft = count_reads(make(SFTTrainer, tokenizer, tmp_path / "sft", steps), steps)
    assert sft.get(("aten::_local_scalar_dense", "step"), 0) <= 2  # the update's check + transformers' mask check
    assert sft.get(("aten::nonzero", "step"), 0) <= 3
    sf = count_reads(make(SelfFusionTrainer, tokenizer, tmp_path / "sf", steps), steps)
    assert sf.get(("aten::_local_scalar_dense", "step"), 0) <= 3  # + the easy copy's row count


def test_metrics_are_read_once_per_logging_interval_and_logged_right(tokenizer, tmp_path):
    """The logged means equal the means of the per-step values (NaN = not measured: left out)."""
    from dlmdistill.training.metrics import MetricWindow

    w = MetricWindow()
    w.add({"a": torch.tensor(1.0), "b": torch.tensor(float("nan")), "c": 2.0})
    w.add({"a": torch.tensor(3.0), "b": torch.tensor(4.0), "c": 4.0})
    w.add({"d": torch.tensor(float("nan"))})
    means = w.means()
    assert means["a"] == 2.0 and means["b"] == 4.0 and means["c"] == 3.0
    assert means["d"] != means["d"]  # NaN: logged as null
    trainer = make(SFTTrainer, tokenizer, tmp_path, 4, static_shapes=True, logging_steps=2)
    trainer.train()
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4]
    assert all(0 <= r["masked_acc"] <= 1 and r["loss"] > 0 and r["grad_norm"] > 0 for r in logs)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_static_shapes_give_the_masked_loss(tokenizer, normalization):
    """The fixed-shape SFT loss (head at every response position, weight 0 off the mask) equals the
    masked-position one on the same draw, and so do its gradients."""
    from dlmdistill.methods.sft import diffusion_batch_loss

    model, tok = tiny_model(tokenizer, seed=0)
    batch = DiffusionCollator(tok.pad_token_id, tok.eos_token_id)(reverse_items(tok, n=8, seed=3))
    out = []
    for static in (False, True):
        model.zero_grad()
        torch.manual_seed(7)
        loss, metrics = diffusion_batch_loss(model, batch, mask_id=model.mask_id, normalization=normalization,
                                             static_shapes=static)
        loss.backward()
        out.append((loss.detach(), {k: float(v) for k, v in metrics.items()},
                    [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, m0, g0), (l1, m1, g1) = out
    torch.testing.assert_close(l1, l0)
    assert m1 == pytest.approx(m0, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("distill", ["both", "either", "own"])
def test_static_shapes_give_the_selffusion_loss(tokenizer, distill):
    """SelfFusion's fixed-shape loss (both copies at every response position, rows off a mode's mask or
    off D weighted 0) equals the gathered one on the same draw: every term, metric and gradient."""
    from dlmdistill.configs.methods import SelfFusionConfig
    from dlmdistill.methods.selffusion import selffusion_batch_loss

    model, tok = tiny_model(tokenizer, seed=0)
    model.add_calibration()
    with torch.no_grad():
        model.calibration.weight.uniform_(0.5, 1.5)  # a calibration that changes the easy logits
    batch = DiffusionCollator(tok.pad_token_id, tok.eos_token_id)(reverse_items(tok, n=8, seed=5))
    cfg = SelfFusionConfig(distill_positions=distill, temperature=2.0)
    out = []
    for static in (False, True):
        model.zero_grad()
        torch.manual_seed(11)
        step = selffusion_batch_loss(model, model, batch, cfg, calibrated=True, uncalibrated_diagnostics=True,
                                     static_shapes=static)
        step.loss.backward()
        out.append((step, {k: float(v) for k, v in step.metrics.items()},
                    [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (s0, m0, g0), (s1, m1, g1) = out
    assert set(s0.terms) == set(s1.terms) == {"diff_easy", "diff_hard", "kd"}
    for k in s0.terms:
        torch.testing.assert_close(s1.terms[k], s0.terms[k], rtol=1e-5, atol=1e-7)
    assert s0.terms["kd"] > 0
    assert set(m0) == set(m1)
    for k in m0:
        assert (m1[k] != m1[k] and m0[k] != m0[k]) or m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_static_selffusion_step_reads_the_device_once(tokenizer, tmp_path):
    steps = 5
    reads = count_reads(make(SelfFusionTrainer, tokenizer, tmp_path, steps, static_shapes=True), steps)
    assert reads.get(("aten::_local_scalar_dense", "step"), 0) <= 1
    assert reads.get(("aten::nonzero", "step"), 0) == 0


@pytest.mark.parametrize("kind", ["dlm", "ar"])
def test_static_shapes_give_the_kd_loss(tokenizer, tmp_path, kind):
    """Logit KD at every response position with rows off the mask (an AR teacher: also token 0 and the EOS
    padding) weighted 0 equals the gathered loss: loss terms, metrics and gradients on the same draw."""
    from dlmdistill.methods.kd import KDConfig, KDTrainer
    from tests.models.test_autoregressive import tiny_ar

    teacher = tiny_model(tokenizer, seed=1)[0] if kind == "dlm" else tiny_ar(tokenizer, seed=1)
    out = []
    for static in (False, True):
        model, tok = tiny_model(tokenizer, seed=0)
        cfg = TrainingConfig(output_dir=str(tmp_path / str(static)), max_steps=1, per_device_train_batch_size=8,
                             progress_bar=False, report_to=["none"], export_final=False, static_shapes=static)
        trainer = KDTrainer(model.train(), tok, reverse_items(tok, 8), cfg, teacher=teacher,
                            method=KDConfig(teacher="(test)", temperature=2.0, ar_skip_eos_padding=True,
                                            divergence="reverse_kl" if kind == "ar" else "forward_kl"),
                            collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
        batch = DiffusionCollator(tok.pad_token_id, tok.eos_token_id)(reverse_items(tok, n=8, seed=9))
        torch.manual_seed(13)
        loss, metrics = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        out.append((loss.detach(), {k: float(v) for k, v in metrics.items()},
                    [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]))
    (l0, m0, g0), (l1, m1, g1) = out
    torch.testing.assert_close(l1, l0)
    assert m0["loss/kd"] > 0 and set(m0) == set(m1)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["dlm", "ar"])
def test_static_kd_step_reads_the_device_once(tokenizer, tmp_path, kind):
    """Logit KD from a DLM or an AR teacher (whose causal mask goes to SDPA ready, so transformers reads
    nothing back): one host read per step."""
    from dlmdistill.methods.kd import KDConfig, KDTrainer
    from tests.models.test_autoregressive import tiny_ar

    model, tok = tiny_model(tokenizer, seed=0)
    teacher = tiny_model(tokenizer, seed=1)[0] if kind == "dlm" else tiny_ar(tokenizer, seed=1)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=16, logging_steps=1000,
                         save_steps=0, progress_bar=False, report_to=["none"], export_final=False, static_shapes=True)
    trainer = KDTrainer(model.train(), tok, reverse_items(tok, 64), cfg, teacher=teacher,
                        method=KDConfig(teacher="(test)", divergence="reverse_kl" if kind == "ar" else "forward_kl"),
                        collate_fn=DiffusionCollator(tok.pad_token_id, tok.eos_token_id))
    reads = count_reads(trainer, 5)
    assert reads.get(("aten::_local_scalar_dense", "step"), 0) <= 1
    assert reads.get(("aten::nonzero", "step"), 0) == 0


def test_diffu_grpo_inner_iterations_read_the_device_once(tokenizer, tmp_path):
    """The update phase of diffu-GRPO: every inner iteration (one optimizer step) over 2 micro-batches makes
    one host read, the finiteness check; the scored positions are found once per rollout batch."""
    from dlmdistill.methods.diffu_grpo import DiffuGRPOConfig, DiffuGRPOTrainer
    from dlmdistill.sampling import GenerationConfig
    from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    gen = GenerationConfig(gen_length=8, steps=4, block_length=8, temperature=1.0)
    t = DiffuGRPOTrainer(model.train(), tok, items_for(examples, tok, gen.gen_length),
                         training_config(tmp_path, per_device_train_batch_size=2, static_shapes=True),
                         task=StubTask(lambda i, c: float(len(c) % 2 == 0)), examples=examples,
                         method=DiffuGRPOConfig(rollout=gen, num_generations=4, num_iterations=3, micro_batch_size=4,
                                                beta=0.04))
    t.score = lambda indices, responses: torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0])  # non-zero advantages
    out = {}
    blocks, counts = reads_in("diffu_grpo.iteration",
                              lambda: out.update(step=t.training_step([t.train_dataset[i] for i in range(2)])))
    assert out["step"][0] and blocks == 3
    assert counts.get("aten::_local_scalar_dense", 0) <= blocks and counts.get("aten::nonzero", 0) == 0


@pytest.mark.parametrize("batch_divide", [1, 2])
def test_dopsd_updates_read_the_device_once(tokenizer, tmp_path, batch_divide):
    """The update phase of d-OPSD under static shapes: every optimizer step over its micro-batches makes one
    host read, the finiteness check (rows, micro-batches and padded prompts are fixed in the rollout phase)."""
    from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer
    from dlmdistill.sampling import GenerationConfig
    from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    gen = GenerationConfig(gen_length=16, steps=8, block_length=4, temperature=1.0)
    t = DOPSDTrainer(model.train(), tok, items_for(examples, tok, gen.gen_length),
                     training_config(tmp_path, static_shapes=True), task=StubTask(lambda i, c: 1.0), examples=examples,
                     method=DOPSDConfig(rollout=gen, micro_batch_size=8, batch_divide=batch_divide, rho=0.5))
    out = {}
    blocks, counts = reads_in("dopsd.update", lambda: out.update(step=t.training_step([t.train_dataset[i]
                                                                                       for i in range(4)])))
    assert out["step"][0] and blocks == batch_divide
    assert counts.get("aten::_local_scalar_dense", 0) <= blocks and counts.get("aten::nonzero", 0) == 0
    # and its rollouts run the sampler's fixed-shape step: no read at all while sampling
    inner = t.rollout

    def rollout(*args, **kwargs):
        with record_function("ROLLOUT"):
            return inner(*args, **kwargs)

    t.rollout = rollout
    calls, counts = reads_in("ROLLOUT", lambda: t.training_step([t.train_dataset[i] for i in range(4)]))
    assert calls >= 1 and sum(counts.values()) == 0, counts


@pytest.mark.parametrize("pass_k_mode", ["first_accepted", "best_of_k"])
def test_dopsd_preparation_reads_nothing_back(tokenizer, tmp_path, pass_k_mode):
    """Between the sampling and the updates (pass@k accept/reject, the step states and their teacher, the
    official trained steps, the counts and the update plan): no host read, and 3 ``nonzero`` per rollout
    batch (the accepted rows, the steps with a commit, the official steps), whatever the rewards."""
    from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer
    from dlmdistill.sampling import GenerationConfig
    from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    gen = GenerationConfig(gen_length=16, steps=8, block_length=4, temperature=1.0)
    t = DOPSDTrainer(model.train(), tok, items_for(examples, tok, gen.gen_length),
                     training_config(tmp_path, static_shapes=True), task=StubTask(lambda i, c: float(len(c) % 2)),
                     examples=examples,
                     method=DOPSDConfig(rollout=gen, micro_batch_size=8, batch_divide=2, rho=0.5, pass_k=3,
                                        pass_k_mode=pass_k_mode, train_steps="official", rejected="zero_weight"))
    inner_rollout, inner_step = t.rollout, t.training_step

    def rollout(*args, **kwargs):
        with record_function("ROLLOUT"):
            return inner_rollout(*args, **kwargs)

    def step(batch):
        with record_function("STEP"):
            return inner_step(batch)

    t.rollout = rollout
    out = {}
    steps, counts = reads_in("STEP", lambda: out.update(step=step([t.train_dataset[i] for i in range(4)])),
                             excluding=("ROLLOUT", "dopsd.update"))
    assert steps == 1 and out["step"][0]
    assert counts.get("aten::_local_scalar_dense", 0) == 0 and counts.get("aten::nonzero", 0) <= 3, counts
