"""The configurations of ``dlmdistill generate`` and ``dlmdistill evaluate`` (``EvalRunConfig`` is
re-exported by ``dlmdistill.evaluation``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ConfigError, check_not_empty, convert_value, field
from .data import DataConfig
from .generation import GenerationConfig
from .model import ModelConfig


#: The step counts ``dlmdistill evaluate`` runs by default.
EVAL_STEPS = (8, 16, 32)


@dataclass
class GenerateRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="the model (run folder, local folder or hub id)")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(gen_length=64, steps=32),
                                         help="sampler settings")
    prompt: list[str] = field(default_factory=list, help="prompt text(s)")
    prompts_file: str | None = field(None, help="JSONL file with a 'prompt' field per line, or a text file (one per line)")
    prompt_format: str = field("plain", help="'plain' or 'chat' (apply the tokenizer's chat template)")
    seed: int = field(0, help="sampling seed")
    output: str | None = field(None, help="write {prompt, completion} JSONL here (default: print)")
    trajectory: str | None = field(None, help="save the recorded trajectory of the first batch (safetensors) here")
    show: bool = field(False, help="watch each response fill in step by step (masked positions as '░'); on a "
                       "terminal in place, otherwise every show_every-th state as plain lines")
    show_delay: float = field(0.05, help="seconds between steps with --show on a terminal")
    show_every: int = field(0, help="with --show and no terminal: print every Nth state (0 = about 8 states)")
    device: str | None = field(None, help="cuda, cpu, ... (default: cuda if available)")

    def validate(self) -> None:
        check_not_empty(self, "prompts_file", "output", "trajectory", "device")
        if self.prompt_format not in ("plain", "chat"):
            raise ValueError(f"prompt_format must be 'plain' or 'chat', got {self.prompt_format!r}")
        if self.show_delay < 0 or self.show_every < 0:
            raise ValueError(f"show_delay and show_every must be >= 0, got {self.show_delay} and {self.show_every}")


@dataclass
class EvalRunConfig:
    """``dlmdistill evaluate``: one model, one task, several step counts and seeds."""

    model: ModelConfig = field(default_factory=ModelConfig, help="the model to evaluate (a run folder, its "
                               "final/ export, a local folder or a hub id)")
    data: DataConfig = field(default_factory=DataConfig, help="task and evaluation data (data.eval_*)")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(gen_length=128, steps=8),
                                         help="sampler settings (generation.steps is replaced by each of 'steps')")
    steps: list[int] = field(default_factory=lambda: list(EVAL_STEPS), help="denoising step counts to evaluate")
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30], help="sampling seeds (SelfFusion uses 10 20 30)")
    output_dir: str | None = field(None, help="where to write generations.jsonl and metrics.json (default: "
                                   "<run>/eval/<task> for a run folder, else eval/<task>)")
    device: str | None = field(None, help="cuda, cpu, ... (default: cuda if available)")
    progress_bar: bool = field(True, help="show progress bars")

    #: ``generation.steps`` is set from ``steps`` (see ``prepare``): an error about it is about ``steps``
    derived_from = {"generation.steps": "steps"}

    def validate(self) -> None:
        check_not_empty(self, "output_dir", "device")
        if not self.steps or not self.seeds:
            raise ValueError("give at least one step count (steps) and one seed (seeds)")
        for s in self.steps:
            replace(self.generation, steps=s).validate()

    @staticmethod
    def prepare(data: dict) -> dict:
        """``generation.steps`` is replaced by each of ``steps``, so it takes the first of them: the
        generation section is then checked with a step count the command runs (not the default 8, which
        e.g. 3 blocks do not divide, nor a run's own step count that ``steps`` replaced). A
        ``generation.steps`` of the user's is refused by ``dlmdistill evaluate`` before this."""
        try:
            steps = convert_value(data.get("steps", EVAL_STEPS), list[int], "steps")
        except ConfigError:
            return data  # building the configuration names the bad value
        generation = data.get("generation") or {}
        if not steps or not isinstance(generation, dict):
            return data
        return {**data, "steps": steps, "generation": {**generation, "steps": steps[0]}}
