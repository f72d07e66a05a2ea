import pytest
import torch

from dlmdistill.sampling import (GenerationConfig, draw_tokens, generate, generator_uniforms, left_pad,
                                 num_transfer_tokens, token_confidence, topk_mask)
from tests.conftest import tiny_model
from tests.llada_reference import llada_generate


def _prompts(n=3, length=6, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, length), generator=g)


@pytest.mark.parametrize("block_length,steps", [(None, 8), (8, 8), (4, 16), (8, 4)])
def test_all_masks_filled_with_scheduled_commits(model_and_tok, block_length, steps):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=16, steps=steps, block_length=block_length)
    prompt = _prompts()
    out = generate(model, prompt, cfg, return_trajectory=True)
    assert not (out.responses == model.mask_id).any()
    assert torch.equal(out.sequences[:, :6], prompt)
    traj = out.trajectory
    assert traj.num_steps == steps
    per_step = traj.committed.sum(-1)  # [S, B]
    block = cfg.block_length or cfg.gen_length
    expected = num_transfer_tokens(torch.tensor([block]), cfg.steps_per_block)[0].repeat(cfg.num_blocks)
    assert torch.equal(per_step, expected[:, None].expand_as(per_step))
    # every position is committed exactly once
    assert torch.equal(traj.committed.sum(0), torch.ones_like(out.responses))


def test_blocks_decoded_in_order_and_trajectory_consistent(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=4)
    out = generate(model, _prompts(), cfg, return_trajectory=True)
    t = out.trajectory
    for s in range(t.num_steps):
        blk = int(t.block[s])
        cols = t.committed[s].any(0).nonzero().flatten()
        assert ((cols // 4) == blk).all(), "commits outside the current block"
        # blocks before the current one are complete, blocks after are untouched
        assert not (t.states[s][:, : blk * 4] == model.mask_id).any()
        assert (t.states[s][:, (blk + 1) * 4:] == model.mask_id).all()
        # state s + committed tokens of step s == state s + 1
        nxt = t.states[s + 1] if s + 1 < t.num_steps else out.responses
        assert torch.equal(torch.where(t.committed[s], nxt, t.states[s]), nxt)
        assert (t.states[s][t.committed[s]] == model.mask_id).all()
    assert torch.equal(t.block, torch.arange(4).repeat_interleave(2))


def test_greedy_is_deterministic_and_padding_does_not_change_a_sample(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=12, steps=6, block_length=6)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    batched = generate(model, prompts, cfg).responses
    assert torch.equal(batched, generate(model, prompts, cfg).responses)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cfg).responses[0]
        assert torch.equal(alone, batched[i])


def test_temperature_sampling_reproducible_with_generator(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=8, steps=4, temperature=1.0)
    p = _prompts()
    a = generate(model, p, cfg, generator=torch.Generator().manual_seed(3)).sequences
    b = generate(model, p, cfg, generator=torch.Generator().manual_seed(3)).sequences
    c = generate(model, p, cfg, generator=torch.Generator().manual_seed(4)).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_remasking_and_cfg_fill_everything(model_and_tok):
    model, _ = model_and_tok
    for cfg in [GenerationConfig(gen_length=8, steps=4, remasking="random"),
                GenerationConfig(gen_length=8, steps=8, cfg_scale=1.5)]:
        out = generate(model, [[6, 7, 8], [9]], cfg, generator=torch.Generator().manual_seed(0))
        assert not (out.responses == model.mask_id).any()


def test_init_response_keeps_given_tokens(model_and_tok):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=8, steps=4)
    init = torch.full((2, 8), model.mask_id)
    init[:, [1, 5]] = 9
    out = generate(model, _prompts(2), cfg, init_response=init, return_trajectory=True)
    assert (out.responses[:, [1, 5]] == 9).all()
    assert not (out.responses == model.mask_id).any()
    # 6 masked positions over 4 steps: 2, 2, 1, 1
    assert out.trajectory.committed.sum(-1)[:, 0].tolist() == [2, 2, 1, 1]


def test_draw_samples_the_softmax_and_never_the_excluded_token():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(60000, 3)
    uniforms = generator_uniforms(torch.Generator().manual_seed(0), "cpu")
    draws = draw_tokens(logits, 1.0, uniforms(None, (60000, 3)))
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.01, rtol=0)
    hot = draw_tokens(logits[:1000], 0.5, uniforms(None, (1000, 3)))
    assert (torch.bincount(hot, minlength=3).double() / 1000)[2] > torch.softmax(logits[0].double(), -1)[2]
    assert (draw_tokens(logits[:5], 0.0) == 2).all()
    # excluding token 2 leaves softmax([0, 1]) over the others at T = 1, and the argmax 1 at T = 0
    rest = draw_tokens(logits, 1.0, uniforms(None, (60000, 3)), exclude=2)
    freq = torch.bincount(rest, minlength=3).double() / rest.numel()
    assert freq[2] == 0 and abs(freq[1] - 1 / (1 + torch.e ** -1)) < 0.01
    assert (draw_tokens(logits[:5], 0.0, exclude=2) == 1).all()
    # the confidence is the probability under the whole vocabulary, excluded token included
    conf = token_confidence(logits[:1], torch.tensor([1]))
    torch.testing.assert_close(conf, torch.tensor([torch.e / (1 + torch.e + torch.e ** 2)], dtype=torch.float64))


def test_schedule_and_topk_helpers():
    assert num_transfer_tokens(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]
    m = topk_mask(torch.tensor([[0.1, 0.9, float("-inf"), 0.5], [1.0, 2.0, 3.0, 4.0]]), torch.tensor([2, 1]))
    assert m.tolist() == [[False, True, False, True], [False, False, False, True]]
    ids, am = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and am.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="multiple of block_length"):
        GenerationConfig(gen_length=10, steps=5, block_length=4).validate()
    with pytest.raises(ValueError, match="number of blocks"):
        GenerationConfig(gen_length=16, steps=6, block_length=4).validate()


# ---------------------------------------------------------------------------------------------
# Per-step equivalence with LLaDA's generate() (tests/llada_reference.py, the oracle)


class MaskHeavy:
    """Logits of a tiny random model with large weights (``initializer_range=0.5``: the top token's
    probability is about 0.4 on average and varies by position), with the mask token's logit set
    below the best other token's by a gap that varies with the position (0.05 to 3.05). So
    p(mask) is large (0.01 to 0.46) and differs by position, yet the mask token is never the
    argmax. Excluding it before the softmax would rescale each confidence by 1 / (1 - p(mask)) and
    change which of 16 candidates are the k most confident in 30-45% of random states (k = 1 to 4),
    while LLaDA's draw is unaffected."""

    def __init__(self, model):
        self.model, self.mask_id = model, model.mask_id

    def __call__(self, input_ids, attention_mask=None, positions=None):
        logits = self.model(input_ids, attention_mask, positions=positions)
        others = logits.clone()
        others[..., self.mask_id] = float("-inf")
        gap = 0.05 + 3.0 * torch.sigmoid((logits[..., 5] - logits[..., 6]) / 4)
        logits[..., self.mask_id] = others.amax(-1) - gap
        return logits


@pytest.fixture
def sharp_model(tokenizer):
    return tiny_model(tokenizer, initializer_range=0.5)[0]


class SharedUniforms:
    """The same random numbers for LLaDA's loop and ours: for step s, ``gumbel[s]`` [B, L, V]
    (float64) and ``order[s]`` [B, L] (float32, like LLaDA's ``torch.rand`` for random remasking).
    The mask token's Gumbel uniform is made tiny so that LLaDA, like us, never draws it: the
    comparison is meant for the states where LLaDA does not draw the mask token.

    ``row`` maps a batch row to its prompt, ``prompt_len`` is where the response starts, so a padded
    batch of our sampler reads the same numbers as the prompt decoded alone."""

    def __init__(self, n_prompts: int, gen_length: int, vocab: int, steps: int, mask_id: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.gumbel = torch.rand((steps, n_prompts, gen_length, vocab), dtype=torch.float64, generator=g)
        self.gumbel[..., mask_id] = 1e-300
        self.order = torch.rand((steps, n_prompts, gen_length), generator=g)
        self.calls = {"gumbel": 0, "order": 0}

    def _next(self, kind):
        s = self.calls[kind]
        self.calls[kind] += 1
        return s

    # LLaDA's hooks: full [B, P + G] tensors (the prompt columns are never used)
    def rand_like(self, logits, dtype):
        b, length, _ = logits.shape
        t = self.gumbel[self._next("gumbel")]
        return torch.cat([torch.full((b, length - t.shape[1], t.shape[2]), 0.5, dtype=dtype), t.to(dtype)], 1)

    def rand(self, shape, device=None):
        t = self.order[self._next("order")]
        return torch.cat([torch.full((shape[0], shape[1] - t.shape[1]), 0.5), t], 1)

    # ours: values at the candidate positions only
    def for_ours(self, prompt_len: int, row=None):
        def uniforms(positions, shape):
            b, i = positions.nonzero(as_tuple=True)
            b = b if row is None else torch.as_tensor(row)[b]
            if len(shape) == 2:
                return self.gumbel[self._next("gumbel")][b, i - prompt_len]
            return self.order[self._next("order")][b, i - prompt_len].double()
        return uniforms


def _trajectories(model, forward, prompt, cfg, seed=0):
    """(LLaDA's states before each step + final [S + 1, B, G], ours the same way). Under
    ``cfg.static_shapes`` ours draws noise for the whole block; the shared numbers at the candidates
    are LLaDA's, so the states must still be LLaDA's."""
    g, p = cfg.gen_length, prompt.shape[1]
    vocab = forward(prompt[:1]).shape[-1]
    ref_noise = SharedUniforms(prompt.shape[0], g, vocab, cfg.steps, model.mask_id, seed)
    record = []
    final = llada_generate(model, prompt, cfg, forward=forward, rand_like=ref_noise.rand_like, rand=ref_noise.rand,
                           record=record)
    ref = torch.stack([x[:, p:] for x in record] + [final[:, p:]])
    our_noise = SharedUniforms(prompt.shape[0], g, vocab, cfg.steps, model.mask_id, seed)
    out = generate(model, prompt, cfg, forward=forward, uniforms=our_noise.for_ours(p), return_trajectory=True)
    ours = torch.cat([out.trajectory.states, out.responses[None]])
    return ref, ours


SETTINGS = [(None, 8), (8, 8), (8, 32), (4, 16), (8, 4), (16, 32)]  # (block_length, steps) for 32 tokens


@pytest.mark.parametrize("block_length,steps", SETTINGS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_per_step_states_equal_llada_reference(sharp_model, block_length, steps, temperature, cfg_scale):
    model = sharp_model
    cfg = GenerationConfig(gen_length=32, steps=steps, block_length=block_length, temperature=temperature,
                           cfg_scale=cfg_scale)
    prompt = _prompts(3, 5)  # batched, equal lengths: LLaDA's loop takes no padding
    ref, ours = _trajectories(model, MaskHeavy(model), prompt, cfg)
    assert (ref[-1] != model.mask_id).all()
    for s in range(len(ref)):
        assert torch.equal(ours[s], ref[s]), f"state before step {s} differs from LLaDA's"


@pytest.mark.parametrize("remasking", ["random", "low_confidence"])
def test_per_step_states_equal_llada_reference_plain_model(model_and_tok, remasking):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=8, temperature=1.0, remasking=remasking)
    ref, ours = _trajectories(model, model, _prompts(2, 4), cfg, seed=1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (0.7, 1.0)])
def test_padding_leaves_every_step_unchanged(sharp_model, temperature, cfg_scale):
    """LLaDA's loop has no padding; ours left-pads a batch and must decode each prompt, step by step,
    as it decodes it alone (fed the same random numbers per prompt and response position)."""
    model = sharp_model
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=8, temperature=temperature, cfg_scale=cfg_scale)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    forward = MaskHeavy(model)
    shared = SharedUniforms(len(prompts), 16, model.vocab_size, cfg.steps, model.mask_id, seed=2)
    batched = generate(model, prompts, cfg, forward=forward, uniforms=shared.for_ours(7), return_trajectory=True)
    assert batched.prompt_length == 7
    for i, p in enumerate(prompts):
        shared = SharedUniforms(len(prompts), 16, model.vocab_size, cfg.steps, model.mask_id, seed=2)
        alone = generate(model, [p], cfg, forward=forward, uniforms=shared.for_ours(len(p), row=[i]),
                         return_trajectory=True)
        assert torch.equal(alone.trajectory.states[:, 0], batched.trajectory.states[:, i])
        assert torch.equal(alone.responses[0], batched.responses[i])


@pytest.mark.parametrize("block_length,steps", [(None, 8), (8, 8), (4, 16), (8, 4)])
@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (0.7, 0.0), (0.7, 1.0)])
def test_static_shapes_states_equal_llada_reference(sharp_model, block_length, steps, temperature, cfg_scale):
    """The fixed-shape denoising step (head, draw and choice over the whole current block) reaches
    LLaDA's state before every step."""
    model = sharp_model
    cfg = GenerationConfig(gen_length=32, steps=steps, block_length=block_length, temperature=temperature,
                           cfg_scale=cfg_scale, static_shapes=True)
    ref, ours = _trajectories(model, MaskHeavy(model), _prompts(3, 5), cfg)
    assert (ref[-1] != model.mask_id).all()
    for s in range(len(ref)):
        assert torch.equal(ours[s], ref[s]), f"state before step {s} differs from LLaDA's"


@pytest.mark.parametrize("remasking", ["random", "low_confidence"])
def test_static_shapes_states_equal_llada_reference_plain_model(model_and_tok, remasking):
    model, _ = model_and_tok
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=8, temperature=1.0, remasking=remasking,
                           static_shapes=True)
    ref, ours = _trajectories(model, model, _prompts(2, 4), cfg, seed=1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.7, "cfg_scale": 1.0}, {"cache": "prefix"},
                                   {"cache": "dual"}, {"remasking": "random", "temperature": 1.0}])
def test_static_shapes_step_reads_nothing_back(model_and_tok, extra):
    """Under static_shapes a denoising step makes no device-to-host read (no ``.item()``, no boolean
    indexing), counted by the profiler over a whole padded-batch generation; the default path reads at
    every step; the model's attention-mask setting is restored afterwards."""
    from tests.training.test_host_syncs import READS, reads_in

    model, _ = model_and_tok
    prompts = [[7, 8, 9, 10, 11], [12, 13]]
    counts = {}
    for static in (False, True):
        cfg = GenerationConfig(gen_length=16, steps=8, block_length=8, static_shapes=static, **extra)

        def run():
            with torch.profiler.record_function("GENERATE"):
                generate(model, prompts, cfg, generator=torch.Generator().manual_seed(0))
        counts[static] = sum(reads_in("GENERATE", run)[1].get(op, 0) for op in READS)
    assert counts[True] == 0 and counts[False] >= cfg.steps
    assert model.static_attention_mask is False


@pytest.mark.slow  # compiles (tens of seconds on a CPU)
def test_compiled_static_step_gives_the_eager_samples(model_and_tok):
    """``compile`` runs the fixed-shape step through torch.compile: the same states as eager, greedy and
    sampled, and the compiled module is made once and reused."""
    from dlmdistill.sampling import _COMPILED, compiled

    model, _ = model_and_tok
    prompts = [[7, 8, 9, 10, 11], [12, 13]]
    for extra in ({}, {"temperature": 0.8, "cfg_scale": 1.0}):
        outs = []
        for compile_ in (False, True):
            cfg = GenerationConfig(gen_length=16, steps=8, block_length=8, static_shapes=True, compile=compile_,
                                   **extra)
            outs.append(generate(model, prompts, cfg, generator=torch.Generator().manual_seed(3),
                                 return_trajectory=True))
        assert torch.equal(outs[1].trajectory.states, outs[0].trajectory.states)
        assert torch.equal(outs[1].sequences, outs[0].sequences)
    assert model in _COMPILED and compiled(model) is _COMPILED[model]  # made once, reused


def test_compile_needs_static_shapes_without_cache():
    with pytest.raises(ValueError, match="compile needs static_shapes"):
        GenerationConfig(gen_length=16, steps=8, compile=True).validate()
    with pytest.raises(ValueError, match="compile needs static_shapes"):
        GenerationConfig(gen_length=16, steps=8, compile=True, static_shapes=True, cache="dual").validate()
