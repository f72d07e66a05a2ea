"""``GenerationConfig``: the sampler's settings (the sampler is ``dlmdistill.sampling``, which re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import field


@dataclass
class GenerationConfig:
    gen_length: int = field(128, help="number of response tokens to generate")
    steps: int = field(128, help="total denoising steps (split evenly over the blocks)")
    block_length: int | None = field(None, help="block size for semi-autoregressive decoding; null = one block")
    temperature: float = field(0.0, help="sampling temperature; 0 = greedy")
    remasking: Literal["low_confidence", "random"] = field("low_confidence",
                                                             help="which predicted tokens to commit at each step")
    cfg_scale: float = field(0.0, help="classifier-free guidance scale w (0 = off)")
    batch_size: int = field(32, help="prompts decoded together")
    cache: Literal["none", "prefix", "dual"] = field(
        "none", help="key/value caching (Fast-dLLM): none = every step runs the whole sequence; prefix = a "
                     "forward at each block's start caches the prompt and finished blocks, steps run the current "
                     "block and the suffix; dual = the suffix is cached too, steps run the current block only. "
                     "Cached keys are not updated within a block (an approximation; see docs/sampling.md)")
    cache_refresh_every: int | None = field(
        None, help="with a cache: also refresh it every N steps within a block (1 = every step: the uncached "
                   "result at a higher cost); null = once per block")
    threshold: float | None = field(
        None, help="parallel decoding (Fast-dLLM): at each step commit every masked position of the current block "
                   "whose confidence is at least this, and at least the most confident one; a block ends when it "
                   "has no masks, so `steps` is not used. Needs remasking=low_confidence; null = the fixed schedule")
    static_shapes: bool = field(
        False, help="no data-dependent shapes in a denoising step, so that it reads nothing back from the device "
                    "(a step CUDA graphs could capture): the LM head runs at every position of the current block "
                    "and the commit is chosen there, and SDPA gets a ready 4-D mask. The same distribution; at "
                    "temperature > 0 or with random remasking other draws than the default path's (it draws "
                    "noise for the whole block). Threshold decoding still reads once per step (a block ends "
                    "when no mask is left)")
    compile: bool = field(
        False, help="run the model through torch.compile (dynamic=False; on CUDA mode reduce-overhead, which "
                    "captures CUDA graphs). Needs static_shapes and cache none: every step then has the same "
                    "shapes and the model compiles once per batch shape. The first batch pays the compilation")

    def validate(self) -> None:
        for name in ("gen_length", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length must be >= 1 (or null: one block), got {self.block_length}")
        block = self.block_length or self.gen_length
        if self.gen_length % block:
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({block})")
        blocks = self.gen_length // block
        if self.steps % blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the number of blocks ({blocks})")
        if self.steps > self.gen_length:
            raise ValueError(f"steps ({self.steps}) cannot exceed gen_length ({self.gen_length})")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.cache not in ("none", "prefix", "dual"):
            raise ValueError(f"cache must be none, prefix or dual, not {self.cache!r}")
        if self.cache_refresh_every is not None and self.cache_refresh_every < 1:
            raise ValueError(f"cache_refresh_every must be >= 1 or null, not {self.cache_refresh_every}")
        if self.compile and (not self.static_shapes or self.cache != "none"):
            raise ValueError("compile needs static_shapes: true and cache: none (a fixed-shape step, compiled once)")
        if self.threshold is not None:
            if not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold must be in [0, 1] (a probability) or null, not {self.threshold}")
            if self.remasking != "low_confidence":
                raise ValueError("threshold decoding compares the model's confidence: it needs "
                                 "remasking=low_confidence")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def trajectory_steps(self) -> int:
        """Steps a recorded trajectory holds: ``steps``, or with ``threshold`` one slot per position
        (``gen_length``: a block takes at most ``block_length`` steps; unused slots commit nothing)."""
        return self.steps if self.threshold is None else self.gen_length

    @property
    def trajectory_steps_per_block(self) -> int:
        return self.trajectory_steps // self.num_blocks
