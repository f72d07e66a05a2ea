"""The lm-evaluation-harness adapter: the ELBO estimator against hand-computed values, and lm-eval's
own machinery (tasks from local YAML files, simple_evaluate, its command line) on a tiny model, offline."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from dlmdistill.integrations import lm_eval as adapter  # noqa: E402
from dlmdistill.models import char_tokenizer  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

CHARS = "0123456789+-*/()=<>abcdefghijklmnopqrstuvwxyz ,:?\n"


# ---------------------------------------------------------------------------- fake models
class CountModel(nn.Module):
    """Vocabulary {0, 1, mask=2}. At a masked position the probability of token 0 is
    ``g(m) = 1 / (m + 1)``, m = number of masked tokens in the row; the mask is never predicted."""

    mask_id, pad_id, eos_id = 2, None, None

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.w.device

    def forward(self, x, attn=None, positions=None):
        m = (x == self.mask_id).sum(dim=1, keepdim=True).double()      # [B, 1]
        g = 1.0 / (m + 1.0)
        logits = torch.cat([torch.log(g), torch.log1p(-g), torch.full_like(g, -1e9)], dim=1)  # [B, 3]
        logits = logits[:, None, :].expand(x.shape[0], x.shape[1], 3)
        return logits[positions] if positions is not None else logits


class ConstModel(CountModel):
    """Logits independent of the input: log-probabilities ``log q`` for tokens 0, 1 (mask excluded)."""

    def __init__(self, q0: float):
        super().__init__()
        self.q0 = q0

    def forward(self, x, attn=None, positions=None):
        lg = torch.tensor([math.log(self.q0), math.log(1 - self.q0), -1e9], dtype=torch.float64)
        logits = lg.expand(x.shape[0], x.shape[1], 3)
        return logits[positions] if positions is not None else logits


# ---------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("L", [1, 2, 3, 5])
def test_elbo_exact_when_a_batch_covers_every_mask_count(L):
    # With l tokens masked, each masked token has log p = log(1 / (l + 1)), so a sample is
    # (L / l) * l * log(1 / (l + 1)) = -L log(l + 1). A stratified batch of L samples holds every
    # l in 1..L once, so the estimate is the bound itself: mean over l of -L log(l + 1) = -log((L + 1)!).
    gen = torch.Generator().manual_seed(0)
    est = adapter.elbo_loglikelihood(CountModel(), [0, 1, 1], [0] * L, mc_num=4 * L, batch_size=L, generator=gen)
    assert est == pytest.approx(-math.lgamma(L + 2), abs=1e-9)


def test_elbo_unbiased_with_uneven_strata():
    # batch 3 does not divide L = 4: the counts are still uniform on 1..4 over the random start,
    # so the mean converges to -log(5!) (per-sample values are -4 log(l + 1), spread < 1.2).
    gen = torch.Generator().manual_seed(1)
    s = adapter.elbo_samples(CountModel(), [1], [0, 0, 0, 0], 3000, 3, generator=gen)
    assert set(s.unique().tolist()) <= {-4 * math.log(l + 1) for l in range(1, 5)}
    assert float(s.mean()) == pytest.approx(-math.lgamma(6), abs=0.05)


def test_elbo_constant_model_is_sum_of_token_logprobs():
    # Input-independent q: E[(L / l) sum over a random l-subset of log q(y_i)] = sum_i log q(y_i).
    q0 = 0.8
    cont = [0, 1, 1, 0, 0]
    exact = 3 * math.log(q0) + 2 * math.log(1 - q0)
    gen = torch.Generator().manual_seed(2)
    s = adapter.elbo_samples(ConstModel(q0), [1, 0], cont, 4000, 16, generator=gen)
    se = float(s.std()) / math.sqrt(len(s))
    assert abs(float(s.mean()) - exact) < 5 * se + 1e-9
    # every sample masks at least one token: (L / l) * (sum of l of the log q) for some l-subset
    assert float(s.max()) <= 5 * math.log(q0) + 1e-9 and float(s.min()) >= 5 * math.log(1 - q0) - 1e-9
    # all tokens equal: every sample is exactly L log q, whatever the mask
    s0 = adapter.elbo_samples(ConstModel(q0), [1], [0, 0, 0], 10, 4, generator=gen)
    assert torch.allclose(s0, torch.full_like(s0, 3 * math.log(q0)))


def test_elbo_single_token_is_exact_log_prob():
    # L = 1: one sample, the token masked with weight 1 -> log p exactly (m = 1 -> g = 1/2, and 1/2 for token 1).
    assert adapter.elbo_loglikelihood(CountModel(), [1, 1], [0], mc_num=128) == pytest.approx(math.log(0.5))
    assert adapter.elbo_loglikelihood(CountModel(), [1, 1], [1], mc_num=128) == pytest.approx(math.log(0.5))


def test_elbo_with_classifier_free_guidance():
    # Guided logits un + (w + 1)(cond - un); the unconditional pass masks the P prompt tokens too, so
    # CountModel sees m = l there instead of l + P. By hand, per mask count l:
    P, L, w = 2, 3, 1.5

    def logp0(l):
        c = [math.log(1 / (l + 1)), math.log(l / (l + 1))]
        u = [math.log(1 / (l + P + 1)), math.log((l + P) / (l + P + 1))]
        z = [ui + (w + 1) * (ci - ui) for ci, ui in zip(c, u)]
        return z[0] - math.log(math.exp(z[0]) + math.exp(z[1]))

    exact = sum(logp0(l) for l in range(1, L + 1))        # mean over l of L * logp0(l)
    gen = torch.Generator().manual_seed(3)
    est = adapter.elbo_loglikelihood(CountModel(), [1] * P, [0] * L, mc_num=6, batch_size=L, cfg_scale=w,
                                     generator=gen)
    assert est == pytest.approx(exact, abs=1e-9)
    assert exact != pytest.approx(-math.lgamma(L + 2))    # guidance did change the value


def test_mask_counts_are_stratified():
    gen = torch.Generator().manual_seed(4)
    for L, b in [(7, 7), (5, 10), (10, 4), (1, 3)]:
        c = adapter._mask_counts(L, b, gen)
        assert c.min() >= 1 and c.max() <= L and len(c) == b
        if b % L == 0:
            assert sorted(c.tolist()) == sorted(list(range(1, L + 1)) * (b // L))


def test_cut_at_stops_uses_the_earliest_stop():
    assert adapter._cut_at_stops("abc\nQuestion: x", ["Question:", "\n"]) == "abc"
    assert adapter._cut_at_stops("no stop here", ["Q:", ""]) == "no stop here"


# ---------------------------------------------------------------------------- the lm-eval model
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = char_tokenizer([CHARS])
    model, tok = tiny_model(tok)
    d = tmp_path_factory.mktemp("tiny_lm_eval")
    model.save_pretrained(d, tokenizer=tok)
    return str(d)


@pytest.fixture(scope="module")
def lm(model_dir):
    return adapter.DLMDistillLM(pretrained=model_dir, device="cpu", steps=8, block_length=4, batch_size=2,
                                mc_num=8, mc_batch_size=4)


def test_generation_settings_from_model_args_and_task(lm, model_dir):
    # block_length and steps set by the user; gen_length from max_gen_toks rounded up to a block multiple
    cfg = lm._resolve_gen_config({"max_gen_toks": 10, "do_sample": False, "temperature": 0.7})
    assert (cfg.gen_length, cfg.steps, cfg.block_length, cfg.temperature, cfg.batch_size) == (12, 8, 4, 0.0, 2)
    cfg = lm._resolve_gen_config({"temperature": 0.5})   # lm-eval's default of 256 tokens
    assert (cfg.gen_length, cfg.temperature) == (256, 0.5)
    # user-set values win over the task's; steps default to gen_length; other fields pass through
    lm2 = adapter.DLMDistillLM(pretrained=model_dir, device="cpu", gen_length="16", temperature=0.3,
                               remasking="random", block_length="none")
    cfg = lm2._resolve_gen_config({"max_gen_toks": 100, "temperature": 0.0})
    assert (cfg.gen_length, cfg.steps, cfg.block_length, cfg.temperature, cfg.remasking) == (16, 16, None, 0.3, "random")


def test_bad_model_args_are_named(model_dir):
    with pytest.raises(adapter.ModelArgsError, match="unknown key.*stepz"):
        adapter.DLMDistillLM(pretrained=model_dir, stepz=4)
    with pytest.raises(adapter.ModelArgsError, match="multiple of block_length"):
        adapter.DLMDistillLM(pretrained=model_dir, gen_length=10, block_length=4)
    with pytest.raises(adapter.ModelArgsError, match="pretrained"):
        adapter.DLMDistillLM()
    with pytest.raises(adapter.ModelArgsError, match="model_args: steps: expected an integer, got 'abc'"):
        adapter.DLMDistillLM(pretrained=model_dir, steps="abc")
    with pytest.raises(adapter.ModelArgsError, match=r"model_args: remasking: 'best' is not one of \['low_confidence', 'random'\]"):
        adapter.DLMDistillLM(pretrained=model_dir, remasking="best")
    with pytest.raises(adapter.ModelArgsError, match="could not load"):
        adapter.DLMDistillLM(pretrained=model_dir + "/missing")


def test_generate_until_batches_and_cuts_at_stops(lm):
    reqs = [Instance("generate_until", {}, (f"{i}+1=", {"until": ["\n"], "max_gen_toks": 8}), i) for i in range(5)]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert len(out) == 5 and all(isinstance(o, str) and "\n" not in o for o in out)
    assert all(len(o) <= 8 for o in out)  # char tokenizer: at most gen_length characters
    # stop strings: whatever the model wrote, the answer ends before the earliest stop found in it
    full = lm.generate_until([Instance("generate_until", {}, ("1+1=", {"until": [], "max_gen_toks": 8}), 0)],
                             disable_tqdm=True)[0]
    if full:
        stop = full[len(full) // 2]
        cut = lm.generate_until([Instance("generate_until", {}, ("1+1=", {"until": [stop], "max_gen_toks": 8}), 0)],
                                disable_tqdm=True)[0]
        assert cut == full[:full.index(stop)]


def test_is_greedy_against_a_model_that_always_prefers_token_0():
    # CountModel gives token 0 probability 1/(m+1) <= 1/2 and token 1 the rest: greedy decoding of
    # n tokens yields token 1 everywhere except the last one (m = 1: a tie 1/2 vs 1/2, argmax -> 0).
    fake = adapter.DLMDistillLM.__new__(adapter.DLMDistillLM)
    fake.model, fake._user_gen = CountModel(), {}
    assert fake._is_greedy([0], [1, 1, 0])
    assert not fake._is_greedy([0], [0, 1, 0])


# ---------------------------------------------------------------------------- lm-eval end to end
def _write_tasks(d):
    gen = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7)]]
    mc = [{"question": "2+2=", "choices": ["4", "5", "22"], "label": 0},
          {"question": "color of sky:", "choices": [" blue", " green"], "label": 0},
          {"question": "3*3=", "choices": ["6", "9", "33"], "label": 1}]
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    cache = d / "hf_cache"
    (d / "tiny_gen.yaml").write_text(f"""task: dlmdistill_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (d / "tiny_mc.yaml").write_text(f"""task: dlmdistill_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")


def test_simple_evaluate_on_local_tasks(model_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path)
    res = lm_eval.simple_evaluate(
        model="dlmdistill",
        model_args=f"pretrained={model_dir},steps=8,block_length=4,mc_num=8,mc_batch_size=4,device=cpu",
        tasks=["dlmdistill_tiny_gen", "dlmdistill_tiny_mc"], batch_size=2,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True)
    gen, mc = res["results"]["dlmdistill_tiny_gen"], res["results"]["dlmdistill_tiny_mc"]
    assert 0.0 <= gen["exact_match,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0
    assert len(res["samples"]["dlmdistill_tiny_gen"]) == 5 and len(res["samples"]["dlmdistill_tiny_mc"]) == 3
    # each multiple-choice doc: one log-likelihood per choice, finite and negative
    for s in res["samples"]["dlmdistill_tiny_mc"]:
        lls = [r[0][0] for r in s["resps"]]
        assert len(lls) == len(s["doc"]["choices"]) and all(math.isfinite(x) and x < 0 for x in lls)
        assert s["acc"] == float(max(range(len(lls)), key=lambda i: lls[i]) == s["doc"]["label"])
    # the generated answers reached the metric: exact_match is the mean of the per-sample scores
    scores = [s["exact_match"] for s in res["samples"]["dlmdistill_tiny_gen"]]
    assert gen["exact_match,none"] == pytest.approx(sum(scores) / 5)


def test_command_line_registers_and_runs(model_dir, tmp_path, monkeypatch, capsys):
    import lm_eval.tasks

    class LocalOnly(lm_eval.tasks.TaskManager):  # indexing lm-eval's ~10k built-in task files takes 20 s here
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    _write_tasks(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["dlmdistill-lm-eval"])
    # no --device: lm-eval passes cuda:0, which falls back to the CPU here
    adapter.cli_evaluate(["--model", "dlmdistill", "--model_args",
                          f"pretrained={model_dir},steps=4,block_length=4,gen_length=8",
                          "--tasks", "dlmdistill_tiny_gen", "--include_path", str(tmp_path), "--limit", "2",
                          "--output_path", str(out)])
    files = list(out.rglob("results*.json"))
    assert files, "lm-eval wrote no results file"
    data = json.loads(files[0].read_text())
    assert "exact_match,none" in data["results"]["dlmdistill_tiny_gen"]
    # a user mistake in model_args: one line on stderr, exit status 2
    with pytest.raises(SystemExit) as e:
        adapter.cli_evaluate(["--model", "dlmdistill", "--model_args", f"pretrained={model_dir},stepz=4",
                              "--tasks", "dlmdistill_tiny_gen", "--include_path", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown key(s) stepz" in capsys.readouterr().err


def test_loglikelihood_rolling_says_why_not(lm):
    with pytest.raises(NotImplementedError, match="lower bound"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abc",), 0)])


def test_chat_template_is_applied_to_the_prompts(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok = char_tokenizer([CHARS])
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    model, tok = tiny_model(tok)
    mdir = tmp_path / "chat_model"
    model.save_pretrained(mdir, tokenizer=tok)
    _write_tasks(tmp_path)
    res = lm_eval.simple_evaluate(
        model="dlmdistill", model_args=f"pretrained={mdir},gen_length=4,steps=4,device=cpu",
        tasks=["dlmdistill_tiny_gen"], limit=2, apply_chat_template=True, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    prompt = res["samples"]["dlmdistill_tiny_gen"][0]["arguments"][0][0]
    assert prompt == "<user>1+2=\n<assistant>"
    # without a template in the tokenizer: a named error, not a jinja traceback
    lm = adapter.DLMDistillLM.__new__(adapter.DLMDistillLM)
    lm.tokenizer, lm.pretrained = char_tokenizer([CHARS]), "x"
    with pytest.raises(adapter.ModelArgsError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_task_length_incompatible_with_user_steps_says_where_it_came_from(lm):
    # steps=8 (user) but the task asks for 4 tokens: 4 rounds up to one block of 4 < 8 steps
    req = Instance("generate_until", {}, ("1+1=", {"until": [], "max_gen_toks": 3}), 0)
    with pytest.raises(adapter.ModelArgsError, match=r"steps \(8\) cannot exceed gen_length \(4\).*max_gen_toks=3"):
        lm.generate_until([req], disable_tqdm=True)
