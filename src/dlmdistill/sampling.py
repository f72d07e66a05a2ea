"""The diffusion sampler, with LLaDA's per-step semantics, and recorded trajectories.

``generate`` appends ``gen_length`` mask tokens to each (left-padded) prompt and denoises them in
``steps`` steps. The response is split into blocks of ``block_length`` tokens decoded left to right
(semi-autoregressive "block diffusion"); the steps are split evenly over the blocks. At every step
a token is drawn at each masked position of the current block (greedy at ``temperature=0``,
otherwise Gumbel-max in float64 as LLaDA writes it, ``argmax exp(logits) / (-log u) ** T``, a
sample of ``softmax(logits / T)``), and the ``k`` most confident of them are committed
(``low_confidence`` remasking: confidence = the full-vocabulary softmax probability of the drawn
token; ``random``: a uniform random score). ``k`` is per sample: a block's masked count is spread
evenly over its steps, the remainder going to the first steps, like LLaDA's
``get_num_transfer_tokens``. Classifier-free guidance (``cfg_scale = w > 0``) mixes a second pass
whose prompt is masked: ``logits = un + (w + 1) * (cond - un)``.

Against LLaDA's public ``generate()`` (transcribed in ``tests/llada_reference.py``, the oracle of
``tests/test_sampling.py``) the per-step states are identical, for unpadded prompts of equal
length fed the same random numbers, as long as LLaDA's draw does not return the mask token at a
masked position of the current block. The differences are:

* the mask token is never drawn (its logit is excluded from the draw only; the confidence still
  comes from the softmax over the whole vocabulary, as in LLaDA). LLaDA can draw it (a converted
  SMDM checkpoint gives it a constant logit of 0, see docs/backbones/smdm.md), which spends a
  commit on a position that stays masked;
* cost: the LM head, the softmax and the noise are computed only at the masked positions of the
  current block (the only ones that can be committed), and the top-k is vectorised over the batch;
* padded prompts get a real attention mask (LLaDA's loop takes no padding);
* the random numbers: LLaDA draws ``[B, L, V]`` uniforms from the global generator at every step
  (even at temperature 0) and float32 ones for ``random`` remasking; we draw float64 ones from
  ``generator`` only where they are used, so a seed gives other samples from the same distribution.

With ``return_trajectory=True`` the output records, for each step, the response state *before*
the step, the positions committed at the step and the block being decoded: d-OPSD trains on this.

Fast decoding (Fast-dLLM, Wu et al. 2025), off by default (``cache: none``, ``threshold: null``
leave every step as above):

* ``cache: prefix | dual``: key/value caching with transformers' ``DynamicCache``. The first step
  of each block (and every ``cache_refresh_every``-th) runs the whole sequence, which gives that
  step's logits and every position's keys and values; the other steps run only a window -- the
  current block plus everything after it (``prefix``) or the current block alone (``dual``) --
  against the cached keys of the other positions. Those keys were computed when the block held
  more masks, so for a model with more than one layer they are stale within a block: an
  approximation, exact only at refresh steps (see ``_Network``).
* ``threshold``: every masked position of the current block whose confidence is at least the
  threshold is committed, and always the most confident one; a block ends when it has no masks
  (``steps`` is not used). A trajectory then has ``gen_length`` step slots (``block_length`` per
  block); the slots a block does not need commit nothing.

``GenerationOutput.forwards`` counts the network evaluations per sample.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Sequence

import torch

from .configs.generation import GenerationConfig
from .models.backbone import (SPLITTABLE_MODEL_TYPES, DiffusionModel, context_limit, left_pad,  # noqa: F401
                              position_ids_from_mask)

if TYPE_CHECKING:
    from .models.autoregressive import CausalLM


@dataclass
class Trajectory:
    """A recorded denoising trajectory (response positions only; S = ``config.trajectory_steps``: the
    steps, or ``gen_length`` slots with a threshold; B = batch, G = gen_length).

    states:    [S, B, G] long, the response before each step (mask id where still masked).
    committed: [S, B, G] bool, positions committed at each step.
    block:     [S] long, index of the block decoded at each step.
    """

    states: torch.Tensor
    committed: torch.Tensor
    block: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.states.shape[0]


@dataclass
class GenerationOutput:
    """sequences: [B, P + G] (left-padded prompts then responses); attention_mask: [B, P + G];
    prompt_length: P; responses: [B, G]; trajectory: set when requested; forwards: [B] long, the
    network evaluations each sample went through (cache refreshes included; two per step with
    classifier-free guidance; the rows of a batch are decoded together, so they share the count)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    trajectory: Trajectory | None = None
    forwards: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


def num_transfer_tokens(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens to commit at each of ``steps`` steps: [B] counts -> [B, steps].

    ``count // steps`` each step, plus one for the first ``count % steps`` steps (LLaDA's schedule).
    """
    base = masked_count // steps
    rem = masked_count % steps
    out = base[:, None].expand(-1, steps).clone()
    out += (torch.arange(steps, device=masked_count.device)[None, :] < rem[:, None]).long()
    return out


Uniforms = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
"""A source of random numbers for ``generate``: ``(positions [B, L] bool, shape) -> float64 uniforms in
[0, 1) of ``shape``, whose first dimension enumerates the True entries of ``positions`` in row-major
order. The default draws from a ``torch.Generator``; a test passes its own to feed another
implementation the same numbers."""


def generator_uniforms(generator: torch.Generator | None, device: torch.device | str) -> Uniforms:
    """Uniforms drawn from ``generator`` (the global generator when None)."""
    def draw(positions: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    return draw


def draw_tokens(logits: torch.Tensor, temperature: float, uniform: torch.Tensor | None = None,
                exclude: int | None = None) -> torch.Tensor:
    """LLaDA's draw: [N, V] logits -> [N] token ids.

    Temperature 0: the argmax. Otherwise Gumbel-max in float64 written as LLaDA writes it,
    ``argmax exp(logits) / (-log u) ** temperature`` with ``uniform`` u ([N, V] in [0, 1)), which
    samples from ``softmax(logits / temperature)`` (like LLaDA's, it overflows for logits above
    about 709). ``exclude`` (the mask id) is never drawn; only the draw is affected, not the
    probabilities.
    """
    if temperature == 0:
        scores = logits.clone()
    else:
        if uniform is None:
            raise ValueError("sampling at temperature > 0 needs uniforms")
        scores = logits.double().exp() / (-torch.log(uniform)) ** temperature
    if exclude is not None and 0 <= exclude < scores.shape[-1]:
        scores[..., exclude] = float("-inf")
    return scores.argmax(dim=-1)


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The probability of ``tokens`` [N] under the float64 softmax of [N, V] ``logits`` (whole vocabulary)."""
    return torch.softmax(logits.double(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-row top-k: [B, N] scores and [B] counts -> [B, N] bool with exactly ``k[b]`` True per row
    (rows must hold at least ``k[b]`` finite scores)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < k[:, None]


@torch.no_grad()
def generate(model: DiffusionModel, prompt_ids: Sequence[Sequence[int]] | torch.Tensor, config: GenerationConfig, *,
             attention_mask: torch.Tensor | None = None, init_response: torch.Tensor | None = None,
             clear_block_on_entry: bool = False, generator: torch.Generator | None = None,
             return_trajectory: bool = False, forward: Callable[..., torch.Tensor] | None = None,
             uniforms: Uniforms | None = None) -> GenerationOutput:
    """Generate responses for a batch of prompts (one call = one batch; see ``generate_texts`` for lists).

    prompt_ids:     token lists (left-padded here) or an already left-padded [B, P] tensor with
                    ``attention_mask``.
    init_response:  optional [B, G] starting response; positions holding the mask id are generated,
                    others are kept (used to regenerate from a partially revealed answer).
    clear_block_on_entry: re-mask a block's pre-filled tokens when decoding reaches it.
    forward:        the module to call for logits when it is not ``model`` itself, e.g. the FSDP-wrapped
                    model during training (``model`` still provides the mask id, padding and device).
                    With a cache it is called with the ``cache`` and ``position_ids`` keywords of
                    ``DiffusionModel.forward``.
    uniforms:       where the random numbers come from (see ``Uniforms``); default: ``generator``.

    ``config.cache`` and ``config.threshold`` select Fast-dLLM's key/value caching and parallel
    decoding (see the module docstring); with neither, every step is LLaDA's.
    """
    config.validate()
    if config.threshold is not None and forward is not None:
        raise ValueError("threshold decoding runs a data-dependent number of forwards, which a wrapped (FSDP) "
                         "`forward` cannot run in lockstep across processes; use threshold: null there")
    device = model.device
    was_training, was_static = model.training, getattr(model, "static_attention_mask", False)
    model.eval()
    try:
        if isinstance(prompt_ids, torch.Tensor):
            prompt = prompt_ids.to(device)
            pmask = (attention_mask if attention_mask is not None else torch.ones_like(prompt)).to(device)
        else:
            pad = model.pad_id if model.pad_id is not None else model.mask_id
            prompt, pmask = left_pad(prompt_ids, pad, device)
        b, p = prompt.shape
        g = config.gen_length
        mask_id = model.mask_id
        x = torch.cat([prompt, torch.full((b, g), mask_id, dtype=torch.long, device=device)], dim=1)
        if init_response is not None:
            x[:, p:] = init_response.to(device)
        attn = torch.cat([pmask, torch.ones((b, g), dtype=pmask.dtype, device=device)], dim=1)
        uncond = None
        if config.cfg_scale > 0:
            uncond = torch.where(pmask.bool(), torch.full_like(prompt, mask_id), prompt)
        fn = model if forward is None else forward
        net = _Network(compiled(fn) if config.compile else fn, model, config, attn, uncond, p)

        block_len = config.block_length or g
        spb = config.steps_per_block
        slots = config.trajectory_steps_per_block
        uniform = uniforms or generator_uniforms(generator, device)
        static = config.static_shapes
        if static:  # SDPA gets a ready 4-D mask (no read of the padding mask), restored in `finally`
            model.static_attention_mask = True
        states, committed_steps, blocks = [], [], []
        for blk in range(config.num_blocks):
            lo, hi = p + blk * block_len, p + (blk + 1) * block_len
            if clear_block_on_entry and init_response is not None:
                x[:, lo:hi] = mask_id
            k_sched = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(dim=1), spb)
            in_block = torch.zeros_like(x, dtype=torch.bool)
            in_block[:, lo:hi] = True
            cols = torch.arange(lo, hi, device=device)[None, :].expand(b, -1)  # [B, block] (static_shapes)
            net.start_block(lo, hi)
            for step in range(slots):
                candidates = (x == mask_id) & in_block
                if return_trajectory:
                    states.append(x[:, p:].clone())
                    blocks.append(blk)
                # a host read: skip a step with nothing left to decode (static_shapes: its commit is empty)
                if (not static or config.threshold is not None) and not bool(candidates.any()):
                    if return_trajectory:
                        committed_steps.append(torch.zeros((b, g), dtype=torch.bool, device=device))
                        continue
                    if config.threshold is not None:
                        break
                    continue
                # logits, draw and confidence at the candidates, [N, V] -> [N], or at the whole block
                at = in_block if static else candidates
                logits = net(x, cols if static else candidates)
                noise = uniform(at, tuple(logits.shape)) if config.temperature > 0 else None
                tokens = draw_tokens(logits, config.temperature, noise, exclude=mask_id)
                if config.remasking == "low_confidence":
                    conf = token_confidence(logits, tokens)
                else:
                    conf = uniform(at, (tokens.shape[0],))
                choice = candidates[:, lo:hi] if static else candidates
                if config.threshold is None:
                    commit = _most_confident(conf, choice, k_sched[:, step])
                else:
                    commit = _above_threshold(conf, choice, config.threshold)
                if static:
                    block = torch.where(commit, tokens.view(b, -1), x[:, lo:hi])
                    x = torch.cat([x[:, :lo], block, x[:, hi:]], dim=1)
                    commit = torch.cat([torch.zeros_like(x[:, :lo], dtype=torch.bool), commit,
                                        torch.zeros_like(x[:, hi:], dtype=torch.bool)], dim=1)
                else:
                    proposal = torch.full_like(x, mask_id)
                    proposal[candidates] = tokens
                    x = torch.where(commit, proposal, x)
                if return_trajectory:
                    committed_steps.append(commit[:, p:].clone())
        traj = None
        if return_trajectory:
            traj = Trajectory(torch.stack(states), torch.stack(committed_steps),
                              torch.as_tensor(blocks, dtype=torch.long, device=device))
        forwards = torch.full((b,), net.forwards, dtype=torch.long, device=device)
        return GenerationOutput(sequences=x, attention_mask=attn, prompt_length=p, trajectory=traj,
                                forwards=forwards)
    finally:
        model.train(was_training)
        if config.static_shapes:
            model.static_attention_mask = was_static


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its compiled forward


def compiled(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``module`` through ``torch.compile`` (``dynamic=False``; mode ``reduce-overhead``, CUDA graphs, when its
    parameters are on a GPU), made once per module and reused by later ``generate`` calls."""
    if module not in _COMPILED:
        cuda = next(module.parameters()).is_cuda
        _COMPILED[module] = torch.compile(module, dynamic=False, mode="reduce-overhead" if cuda else None)
    return _COMPILED[module]


def candidate_scores(conf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``conf`` laid out as ``candidates`` [B, L], -inf off them: ``conf`` holds a value per candidate
    (row-major), or one per entry of ``candidates`` (a fixed shape: no boolean indexing; when every entry
    is a candidate the two readings agree)."""
    if conf.numel() == candidates.numel():
        return torch.where(candidates, conf.view(candidates.shape), float("-inf"))
    score = torch.full(candidates.shape, float("-inf"), dtype=conf.dtype, device=conf.device)
    score[candidates] = conf
    return score


def _most_confident(conf: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[b]`` candidates of each row with the highest ``conf`` ([N] at the True entries of
    ``candidates`` [B, L] in row-major order, or [B * L] at every entry) -> [B, L] bool."""
    return topk_mask(candidate_scores(conf, candidates), torch.minimum(k, candidates.sum(dim=1))) & candidates


def _above_threshold(conf: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's parallel commit: the candidates of each row whose ``conf`` is at least ``threshold``,
    and always the row's most confident one (rows without candidates commit nothing) -> [B, L] bool."""
    best = _most_confident(conf, candidates, torch.ones(candidates.shape[0], dtype=torch.long,
                                                        device=candidates.device))
    return (best | (candidate_scores(conf, candidates) >= threshold)) & candidates


class _Network:
    """The model calls of ``generate``: logits at the candidates [N, V], with classifier-free guidance
    and the key/value cache of ``config.cache``; counts the network evaluations per sample.

    With a cache, ``start_block`` marks the cache stale; the next call (and every
    ``cache_refresh_every``-th after it) runs the whole sequence, which gives that step's logits and
    fills a ``DynamicCache`` with every position's keys and values. The *window* -- the current block
    for ``dual``, the block and everything after it for ``prefix``, starting one position earlier for
    a shifted-logit model, whose block logits come from the hidden states one position to the left --
    is then cropped out of the cache; the keys that stay are in the order (before the window, after
    the window). Each following step runs the window alone, at its true positions, against those
    keys (its own keys are appended, then cropped off again), with the padding mask reordered the
    same way."""

    def __init__(self, fn: Callable[..., torch.Tensor], model: DiffusionModel, config: GenerationConfig,
                 attn: torch.Tensor, uncond_prompt: torch.Tensor | None, p: int):
        self.fn, self.model, self.config, self.p = fn, model, config, p
        self.uncond, self.w = uncond_prompt, config.cfg_scale
        self.attn = torch.cat([attn, attn]) if uncond_prompt is not None else attn
        self.per_call = 2 if uncond_prompt is not None else 1
        self.forwards = 0
        self.cache = None
        if config.cache != "none":
            if not getattr(model, "splittable", False):
                name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
                raise ValueError(f"cache: {config.cache} needs a backbone that transformers runs with a key/value "
                                 f"cache (model types: {', '.join(sorted(SPLITTABLE_MODEL_TYPES))}); {name!r} is "
                                 f"not one: use cache: none")
            self.position_ids = position_ids_from_mask(self.attn)

    def start_block(self, lo: int, hi: int) -> None:
        if self.config.cache == "none":
            return
        shift = int(self.model.shift_logits)
        length = self.attn.shape[1]
        self.window = (lo - shift, hi if self.config.cache == "dual" else length)
        self.cache, self.since_refresh = None, 0

    def _inputs(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uncond is None:
            return x, positions
        xu = torch.cat([self.uncond, x[:, self.p:]], dim=1)
        return torch.cat([x, xu]), torch.cat([positions, positions])

    def _combine(self, logits: torch.Tensor) -> torch.Tensor:
        if self.uncond is None:
            return logits
        cond, un = logits.chunk(2)
        return un + (self.w + 1.0) * (cond - un)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ids, pos = self._inputs(x, positions)
        self.forwards += self.per_call
        if self.config.cache == "none":
            return self._combine(self.fn(ids, self.attn, positions=pos))
        every = self.config.cache_refresh_every
        if self.cache is None or (every is not None and self.since_refresh >= every):
            return self._combine(self._refresh(ids, pos))
        self.since_refresh += 1
        lo, hi = self.window
        at = pos[:, lo:hi] if pos.dtype == torch.bool else pos - lo  # a mask of the window, or its columns
        logits = self.fn(ids[:, lo:hi], self.kv_mask, positions=at, cache=self.cache,
                         position_ids=self.position_ids[:, lo:hi])
        self.cache.crop(-(hi - lo))
        return self._combine(logits)

    def _refresh(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        logits = self.fn(ids, self.attn, positions=pos, cache=cache, position_ids=self.position_ids)
        lo, hi = self.window
        length = ids.shape[1]
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise ValueError("key/value caching supports full-attention layers only (this backbone's cache has "
                             f"{sorted({type(layer).__name__ for layer in cache.layers})}); use cache: none")
        if hi == length:
            cache.crop(-(length - lo))
        else:  # drop the window from the middle: the keys before it, then those after it
            for layer in cache.layers:
                layer.keys = torch.cat([layer.keys[..., :lo, :], layer.keys[..., hi:, :]], dim=-2)
                layer.values = torch.cat([layer.values[..., :lo, :], layer.values[..., hi:, :]], dim=-2)
        # the padding mask in the cache's key order (with left padding every key from lo on is real, so
        # this equals self.attn; kept general)
        self.kv_mask = torch.cat([self.attn[:, :lo], self.attn[:, hi:], self.attn[:, lo:hi]], dim=1)
        self.cache, self.since_refresh = cache, 1
        return logits


def decode_responses(tokenizer, responses: torch.Tensor, eos_id: int | None = None) -> list[str]:
    """Decode [B, G] responses, cutting each at its first EOS and dropping special tokens."""
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    out = []
    for row in responses.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def generate_batches(model: DiffusionModel | CausalLM, prompts: Sequence[Sequence[int]], config: GenerationConfig, *,
                     generator: torch.Generator | Callable[[], torch.Generator] | None = None,
                     order: Literal["given", "shortest_first", "longest_first"] = "given",
                     forward: Callable[..., torch.Tensor] | None = None,
                     trajectory: Callable[[int], bool] | bool = False,
                     progress: bool = False, desc: str = "generate"
                     ) -> Iterator[tuple[list[int], torch.Tensor, GenerationOutput | None]]:
    """The one batched-generation loop of the package (the command line, the evaluation harness, the API and
    the lm-evaluation-harness model all use it): responses for token-id ``prompts`` in batches of
    ``config.batch_size``.

    Yields ``(indices, responses [b, G], output)`` per batch, ``indices`` into ``prompts``. ``output`` is the
    sampler's :class:`GenerationOutput` for a DLM, or None for a causal LM (it samples left to right from
    the global RNG, with ``config``'s length and temperature). ``order``: the prompts' own order, or sorted
    by length so that a batch wastes little padding (yielded in that order; ``indices`` say where each
    belongs). ``generator``: the sampler's generator, or a function returning a fresh one per batch.
    ``trajectory``: record the trajectory of every batch, or of the batches (numbered from 0) for which
    the function says so. A progress bar counts prompts."""
    from tqdm.auto import tqdm

    from .models.autoregressive import CausalLM

    idx = list(range(len(prompts)))
    if order != "given":
        idx.sort(key=lambda i: len(prompts[i]), reverse=order == "longest_first")
    bar = tqdm(total=len(idx), desc=desc, disable=not progress, unit="prompt", leave=False, dynamic_ncols=True)
    try:
        for n, start in enumerate(range(0, len(idx), config.batch_size)):
            chunk = idx[start:start + config.batch_size]
            batch = [prompts[i] for i in chunk]
            if isinstance(model, CausalLM):
                yield chunk, model.generate_responses(batch, config), None
            else:
                g = generator() if callable(generator) else generator
                record = trajectory(n) if callable(trajectory) else trajectory
                out = generate(model, batch, config, generator=g, forward=forward, return_trajectory=record)
                yield chunk, out.responses, out
            bar.update(len(chunk))
    finally:
        bar.close()


def generate_texts(model: DiffusionModel, tokenizer, prompts: Sequence[str], config: GenerationConfig, *,
                   seed: int | None = None, progress: bool = False, max_prompt_length: int | None = None) -> list[str]:
    """Generate a response string for each prompt (``generate_batches``), in the prompts' order."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device).manual_seed(seed)
    ids = [tokenizer(pr, add_special_tokens=False).input_ids for pr in prompts]
    limit = max_prompt_length or context_limit(model)
    for i, x in enumerate(ids):
        if limit is not None and len(x) + config.gen_length > limit:
            raise ValueError(f"prompt {i} has {len(x)} tokens; with gen_length {config.gen_length} that exceeds the "
                             f"model's limit of {limit} positions")
    out: list[str] = []
    for _, responses, _ in generate_batches(model, ids, config, generator=gen, progress=progress):
        out.extend(decode_responses(tokenizer, responses))
    return out


