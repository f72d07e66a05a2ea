"""Fast decoding: key/value caching (``cache: prefix | dual``) and threshold parallel decoding.

Oracles: the uncached sampler (itself checked step by step against LLaDA's ``generate()`` in
tests/test_sampling.py), a plain full forward of the model, and Fast-dLLM's commit rule (the most
confident candidate, plus every candidate whose confidence is at least the threshold), applied
here to probabilities computed from a full forward, not by the sampler.
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dlmdistill.models.backbone import DiffusionModel
from dlmdistill.sampling import GenerationConfig, _above_threshold, generate
from tests.conftest import tiny_model

PROMPTS = [[7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]  # left padding in a batch


def qwen2_shifted(tokenizer, layers=2, seed=0):
    """A Dream-like backbone: Qwen2 (grouped-query attention, attention bias) with is_causal=False
    and shifted logits (token i predicted from position i - 1)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.5, is_causal=False, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    hf = Qwen2ForCausalLM(cfg).eval()
    return DiffusionModel(hf, tokenizer.mask_token_id, shift_logits=True, pad_id=tokenizer.pad_token_id,
                          eos_id=tokenizer.eos_token_id).eval()


def backbone(kind, tokenizer, layers):
    if kind == "llama":
        return tiny_model(tokenizer, num_hidden_layers=layers, initializer_range=0.5)[0]
    return qwen2_shifted(tokenizer, layers)


BASE = dict(gen_length=32, steps=16, block_length=8)


@pytest.mark.parametrize("kind", ["llama", "qwen2_shifted"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("extra", [{}, {"temperature": 0.7, "cfg_scale": 1.0}])
def test_cache_refreshed_every_step_equals_uncached(tokenizer, kind, cache, extra):
    model = backbone(kind, tokenizer, layers=2)
    plain = GenerationConfig(**BASE, **extra)
    ref = generate(model, PROMPTS, plain, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    out = generate(model, PROMPTS, GenerationConfig(**BASE, **extra, cache=cache, cache_refresh_every=1),
                   generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert torch.equal(out.trajectory.states, ref.trajectory.states)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.forwards, ref.forwards)


@pytest.mark.parametrize("kind", ["llama", "qwen2_shifted"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("prompts", [PROMPTS, [[7, 8, 9, 10], [11, 12, 13, 14]]], ids=["padded", "unpadded"])
@pytest.mark.parametrize("static", [False, True], ids=["", "static_shapes"])
def test_one_layer_model_cached_steps_are_exact(tokenizer, kind, cache, prompts, static):
    """With one layer a position's key and value depend on its own token only, so keys cached at a
    block's start stay exact while the block is decoded: the cached sampler (one refresh per block,
    every other step run on the window alone) must reach the uncached states at every step. This
    checks the window's positions, padding mask and key order, which the refresh-every-step test
    cannot see. Without padding transformers passes no mask at all: the window must still attend to
    every key (not causally)."""
    model = backbone(kind, tokenizer, layers=1)
    ref = generate(model, prompts, GenerationConfig(**BASE), return_trajectory=True)
    out = generate(model, prompts, GenerationConfig(**BASE, cache=cache, static_shapes=static), return_trajectory=True)
    for s in range(ref.trajectory.num_steps):
        assert torch.equal(out.trajectory.states[s], ref.trajectory.states[s]), f"step {s}"
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("kind", ["llama", "qwen2_shifted"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_window_logits_equal_full_forward_on_the_cached_state(tokenizer, kind, cache):
    """Deep model, padded batch: right after the cache was filled from state x, a cached step on the
    same x must give the full forward's logits at the candidates (fp32)."""
    from dlmdistill.sampling import _Network
    from dlmdistill.sampling import left_pad

    model = backbone(kind, tokenizer, layers=3)
    prompt, pmask = left_pad(PROMPTS, tokenizer.pad_token_id)
    p, g = prompt.shape[1], 24
    gen = torch.Generator().manual_seed(1)
    resp = torch.randint(5, 30, (3, g), generator=gen)
    resp[:, 10:] = model.mask_id
    resp[0, 13] = 9  # a committed token inside the block
    x = torch.cat([prompt, resp], 1)
    attn = torch.cat([pmask, torch.ones_like(resp)], 1)
    lo, hi = p + 8, p + 16
    cand = (x == model.mask_id)
    cand[:, :lo] = False
    cand[:, hi:] = False
    full = model(x, attn, positions=cand)
    net = _Network(model, model, GenerationConfig(gen_length=g, steps=g, block_length=8, cache=cache), attn, None, p)
    net.start_block(lo, hi)
    first = net(x, cand)   # refresh: the full forward itself
    second = net(x, cand)  # the window against the cached keys
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)
    assert net.forwards == 2
    # after a step the cache holds the same keys as before it (the window was cropped off again)
    assert net.cache.get_seq_length() == x.shape[1] - (net.window[1] - net.window[0])


def test_deep_model_cache_is_an_approximation(tokenizer):
    """The accepted Fast-dLLM approximation: with two layers the cached keys go stale within a
    block, and for this random model some decoded tokens differ from the uncached ones."""
    model = backbone("llama", tokenizer, layers=2)
    ref = generate(model, PROMPTS, GenerationConfig(**BASE)).sequences
    differs = [not torch.equal(generate(model, PROMPTS, GenerationConfig(**BASE, cache=c)).sequences, ref)
               for c in ("prefix", "dual")]
    assert any(differs)


def test_above_threshold_rule_hand_computed():
    cand = torch.tensor([[True, True, False, True], [True, False, False, False], [False] * 4])
    conf = torch.tensor([0.95, 0.5, 0.91, 0.3], dtype=torch.float64)  # row 0: columns 0, 1, 3; row 1: column 0
    out = _above_threshold(conf, cand, 0.9)
    assert out.tolist() == [[True, False, False, True], [True, False, False, False], [False] * 4]
    out = _above_threshold(torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=torch.float64), cand, 0.9)
    assert out.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4]
    out = _above_threshold(torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=torch.float64), cand, 0.2)
    assert out.tolist() == [[True, True, False, False], [True, False, False, False], [False] * 4]


@pytest.mark.parametrize("threshold", [0.3, 0.6])
@pytest.mark.parametrize("static", [False, True], ids=["", "static_shapes"])
def test_threshold_commits_follow_fast_dllm_rule(tokenizer, threshold, static):
    model = backbone("llama", tokenizer, layers=2)
    cfg = GenerationConfig(**BASE, threshold=threshold, static_shapes=static)
    out = generate(model, PROMPTS, cfg, return_trajectory=True)
    t = out.trajectory
    assert t.num_steps == cfg.gen_length == cfg.trajectory_steps
    assert torch.equal(t.block, torch.arange(32) // 8)
    assert not (out.responses == model.mask_id).any()
    assert torch.equal(t.committed.sum(0), torch.ones_like(out.responses))
    p = out.prompt_length
    used = 0
    for s in range(t.num_steps):
        blk = int(t.block[s])
        cand = t.states[s] == model.mask_id
        cand[:, : blk * 8] = False
        cand[:, (blk + 1) * 8:] = False
        if not cand.any():
            assert not t.committed[s].any()
            continue
        used += 1
        x = torch.cat([out.sequences[:, :p], t.states[s]], 1)
        probs = torch.softmax(model(x, out.attention_mask)[:, p:].double(), -1)
        other = probs.clone()
        other[..., model.mask_id] = -1
        conf = other.max(-1)  # greedy: the drawn token is the argmax (never the mask token)
        for r in range(3):
            c = conf.values[r]
            if not cand[r].any():
                assert not t.committed[s, r].any()
                continue
            best = int(torch.where(cand[r], c, torch.tensor(-1.0, dtype=torch.float64)).argmax())
            expected = cand[r] & (c >= threshold)
            expected[best] = True
            assert torch.equal(t.committed[s, r], expected), (s, r)
            assert torch.equal(t.states[s + 1, r][expected] if s + 1 < t.num_steps else out.responses[r][expected],
                               conf.indices[r][expected])
    assert int(out.forwards[0]) == used
    if threshold == 0.3:
        assert used < cfg.gen_length  # several tokens per step somewhere


def test_threshold_extremes_and_forward_counts(tokenizer):
    model = backbone("llama", tokenizer, layers=2)
    zero = generate(model, PROMPTS, GenerationConfig(**BASE, threshold=0.0))
    assert zero.forwards.tolist() == [4, 4, 4]  # a whole block per step
    one = generate(model, PROMPTS, GenerationConfig(**BASE, threshold=1.0))
    assert one.forwards.tolist() == [32, 32, 32]  # one token per step (no probability reaches 1 here)
    plain = generate(model, PROMPTS, GenerationConfig(**BASE))
    assert plain.forwards.tolist() == [16] * 3
    cfg = generate(model, PROMPTS, GenerationConfig(**BASE, cfg_scale=1.0, cache="dual"))
    assert cfg.forwards.tolist() == [32] * 3  # two network evaluations per step
    refresh = generate(model, PROMPTS, GenerationConfig(**BASE, cache="prefix", cache_refresh_every=2))
    assert refresh.forwards.tolist() == [16] * 3  # a refresh replaces a step's forward


def test_threshold_and_cache_fill_everything_with_sampling(tokenizer):
    model = backbone("qwen2_shifted", tokenizer, layers=2)
    cfg = GenerationConfig(**BASE, threshold=0.5, cache="dual", temperature=1.0, cfg_scale=0.5)
    out = generate(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert not (out.responses == model.mask_id).any()
    t = out.trajectory
    for s in range(t.num_steps):
        nxt = t.states[s + 1] if s + 1 < t.num_steps else out.responses
        assert torch.equal(torch.where(t.committed[s], nxt, t.states[s]), nxt)


def test_bad_settings_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="remasking=low_confidence"):
        GenerationConfig(**BASE, threshold=0.9, remasking="random").validate()
    with pytest.raises(ValueError, match="threshold must be in"):
        GenerationConfig(**BASE, threshold=1.5).validate()
    with pytest.raises(ValueError, match="cache_refresh_every"):
        GenerationConfig(**BASE, cache="dual", cache_refresh_every=0).validate()
    with pytest.raises(ValueError, match="cache must be"):
        GenerationConfig(**BASE, cache="full").validate()
    model = backbone("llama", tokenizer, layers=1)
    model.splittable = False  # as a remote-code backbone
    with pytest.raises(ValueError, match="use cache: none"):
        generate(model, PROMPTS, GenerationConfig(**BASE, cache="prefix"))
    with pytest.raises(ValueError, match="lockstep"):
        generate(model, PROMPTS, GenerationConfig(**BASE, threshold=0.9), forward=model)


@pytest.mark.parametrize("rollout", [dict(cache="dual", threshold=0.0), dict(cache="prefix"),
                                     dict(threshold=0.7)])
def test_dopsd_step_on_cached_threshold_rollouts(tokenizer, tmp_path, rollout):
    from dlmdistill.methods.dopsd import DOPSDConfig, DOPSDTrainer
    from tests.methods.stubs import StubTask, items_for, stub_examples, training_config

    gen = GenerationConfig(gen_length=16, steps=8, block_length=4, temperature=1.0, batch_size=3, **rollout)
    model, tok = tiny_model(tokenizer)
    examples = stub_examples(4)
    t = DOPSDTrainer(model.train(), tok, items_for(examples, tok, gen.gen_length), training_config(tmp_path),
                     task=StubTask(lambda i, c: 1.0), examples=examples,
                     method=DOPSDConfig(rollout=gen, pass_k=1, micro_batch_size=16))
    seen = []
    orig = t.step_states
    t.step_states = lambda roll, rows: seen.append(orig(roll, rows)) or seen[-1]
    stepped, m = t.training_step([t.train_dataset[i] for i in range(4)])
    assert stepped and torch.isfinite(torch.as_tensor(m["loss"])) and m["trained_trajectories"] == 4.0
    steps = seen[0]
    # every answer position is trained exactly once over its trajectory's steps
    per_traj = torch.zeros(4, dtype=torch.long).index_add_(0, steps.rows, steps.committed.sum(1))
    assert per_traj.tolist() == [16] * 4
    assert (steps.committed <= steps.candidates).all()
    if rollout.get("threshold") == 0.0:  # a whole block per step: 4 steps per trajectory, unused slots dropped
        assert len(steps) == 4 * 4 and (steps.k == 4).all()


def test_command_line_generate_and_evaluate_with_cache_and_threshold(tokenizer, tmp_path):
    import json

    from safetensors.torch import load_file

    from dlmdistill.cli import main

    model, tok = tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "m", tok)
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "numbers: 1 2 3 target: 6\n",
                 "--gen_length", "32", "--steps", "8", "--block_length", "16", "--cache", "dual", "--threshold", "0.5",
                 "--output", str(out), "--trajectory", str(tmp_path / "traj.safetensors")]) == 0
    assert set(json.loads(out.read_text())) == {"prompt", "completion"}
    traj = load_file(str(tmp_path / "traj.safetensors"))
    assert traj["states"].shape[0] == 32 and traj["committed"].sum() == 32  # one slot per position
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--task", "countdown", "--limit", "4", "--steps", "8",
                 "--seeds", "1", "--gen_length", "32", "--cache", "prefix", "--cache_refresh_every", "2",
                 "--output_dir", str(ev), "--progress_bar", "false"]) == 0
    assert "8" in json.loads((ev / "metrics.json").read_text())["results"]


def test_lora_backbone_caches_through_its_adapters(tokenizer):
    from dlmdistill.models import ModelConfig, build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(preset_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                         "num_attention_heads": 4, "num_hidden_layers": 1},
                                       lora_r=4, lora_dropout=0.0), tokenizer=tokenizer)
    model.eval()
    with torch.no_grad():  # non-zero adapters, so that they change the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref = generate(model, PROMPTS, GenerationConfig(**BASE)).sequences
    with model.adapters_disabled():
        assert not torch.equal(generate(model, PROMPTS, GenerationConfig(**BASE)).sequences, ref)
    for cache in ("prefix", "dual"):  # one layer: exact (see above)
        assert torch.equal(generate(model, PROMPTS, GenerationConfig(**BASE, cache=cache)).sequences, ref)
