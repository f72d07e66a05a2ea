"""The shipped Countdown configs: their answers fit the lengths they train and decode with.

The collator cuts a response longer than ``data.response_length`` without a word, and a sampler
with fewer tokens than the answer cannot write it, so these tests tokenize the configs' own data
with the configs' own tokenizer (a BPE trained on it, as a run does) and check the lengths.
"""

from pathlib import Path

import pytest

from dlmdistill.config import load_config
from dlmdistill.data import load_examples
from dlmdistill.methods import get_method
from dlmdistill.methods.common import example_texts
from dlmdistill.models.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {name: ROOT / "configs" / f"{name}_countdown_tiny.yaml" for name in ("sft", "dopsd", "diffu_grpo")}


def _load(name: str):
    cls, _ = get_method(name.replace("_", "-"))
    return load_config(cls, CONFIGS[name], [])


@pytest.fixture(scope="module")
def base():
    """The SFT config with 2,000 of its training puzzles, and the tokenizer a run would train on them."""
    cfg = _load("sft")
    cfg.data.train_limit, cfg.data.eval_limit = 2000, 200
    train, test = load_examples(cfg.data, "train"), load_examples(cfg.data, "eval")
    assert cfg.model.tokenizer.startswith("bpe:")
    tok = train_bpe_tokenizer(example_texts(train, test), vocab_size=int(cfg.model.tokenizer[4:]))
    return cfg, train, test, tok


def test_every_number_is_one_token(base):
    *_, tok = base
    for n in range(1, 101):
        assert len(tok(str(n))["input_ids"]) == 1 and len(tok(f" {n}")["input_ids"]) == 1, n


def test_answers_fit_the_response_length_and_the_generation(base):
    cfg, train, test, tok = base
    longest_response = max(len(tok(ex.target)["input_ids"]) for ex in train) + 1  # + EOS
    longest_prompt = max(len(tok(ex.prompt)["input_ids"]) for ex in train + test)
    assert longest_response <= cfg.data.response_length
    assert longest_prompt + cfg.data.response_length <= cfg.data.max_length
    for name in CONFIGS:
        c = _load(name)
        gens = [c.eval.generation] + ([c.method.rollout] if hasattr(c, "method") and hasattr(c.method, "rollout")
                                      else [])
        for g in gens:
            assert longest_response <= g.gen_length <= c.data.response_length, (name, g)
        assert (c.data.max_length, c.data.response_length) == (cfg.data.max_length, cfg.data.response_length)


def test_post_training_decodes_in_several_blocks():
    """One block would leave d-OPSD's self-future teacher nothing to reveal (docs/methods/dopsd.md)."""
    for name in ("dopsd", "diffu_grpo"):
        c = _load(name)
        for g in (c.eval.generation, c.method.rollout):
            assert g.gen_length // g.block_length >= 2, (name, g)
