"""lm-evaluation-harness adapter: evaluate a dlmdistill model with ``lm_eval``'s tasks and metrics.

Importing this module registers the model name ``dlmdistill`` with lm-eval. lm-eval (0.4.x) has no
plugin entry points for models, so its own ``lm_eval`` command cannot see the name; use

    python -m dlmdistill.integrations.lm_eval --model dlmdistill \\
        --model_args pretrained=PATH,steps=256,gen_length=256,block_length=32 --tasks gsm8k --batch_size 16

(or the ``dlmdistill-lm-eval`` script), which registers the name and then runs lm-eval's command
line with the same arguments. From Python::

    import lm_eval
    import dlmdistill.integrations.lm_eval  # registers "dlmdistill"
    lm_eval.simple_evaluate(model="dlmdistill", model_args="pretrained=PATH,gen_length=128", tasks=["gsm8k"])

Request types (see docs/evaluation.md):

* ``generate_until``: dlmdistill's sampler (``dlmdistill.sampling.generate``) in batches of
  ``batch_size``; the text is cut at the first EOS token and then at the earliest stop string of
  ``until``.
* ``loglikelihood``: the Monte-Carlo estimate of the masked-diffusion lower bound that LLaDA's
  evaluation code uses (``elbo_loglikelihood``), with ``mc_num`` samples; ``is_greedy`` comes from
  a greedy one-token-per-step decode of the continuation (``check_greedy``).
* ``loglikelihood_rolling`` (perplexity tasks): not supported, raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import typing
from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..config import ConfigError, convert_value
from ..sampling import GenerationConfig, generate, generate_batches

log = logging.getLogger(__name__)

MODEL_NAME = "dlmdistill"
#: generation length when neither model_args nor the task set one (lm-eval's Hugging Face default)
DEFAULT_MAX_GEN_TOKS = 256

#: GenerationConfig fields whose value a task's ``generation_kwargs`` may supply when the user did
#: not set them in ``model_args``. Every other GenerationConfig field passes through unchanged.
_GEN_FIELDS = {f.name: f for f in dataclasses.fields(GenerationConfig)}


#: ModelConfig fields that make sense when loading a trained model for evaluation
_LOAD_FIELDS = {"tokenizer", "revision", "trust_remote_code", "mask_token", "shift_logits", "attn_implementation",
                "gguf_file"}


class ModelArgsError(ValueError):
    """A bad ``model_args`` value (a user mistake, reported without a traceback by the CLI)."""


# ---------------------------------------------------------------------------- the estimator
def _mask_counts(length: int, b: int, generator: torch.Generator | None) -> torch.Tensor:
    """``b`` numbers of masked tokens in ``1..length``, stratified like LLaDA's evaluation code: a
    random start ``k`` and then steps of ``length / b``, wrapped around ``length``, so a batch covers
    the range of mask ratios evenly. Each count is marginally uniform on ``1..length`` (k is), which
    keeps the estimate unbiased. LLaDA rounds the steps half-to-even; we floor them, so that a batch
    whose size is a multiple of ``length`` holds every count equally often."""
    k = int(torch.randint(1, length + 1, (1,), generator=generator))
    offsets = torch.div(torch.arange(b) * length, b, rounding_mode="floor")
    return (k - 1 + offsets) % length + 1


def _masked_logits(model, x: torch.Tensor, positions: torch.Tensor, prompt_len: int, cfg_scale: float) -> torch.Tensor:
    """Logits at ``positions`` ([N, V]); with classifier-free guidance ``un + (w + 1) * (cond - un)``
    where the unconditional pass has its prompt masked (as the sampler does)."""
    if cfg_scale <= 0:
        return model(x, None, positions=positions)
    xu = x.clone()
    xu[:, :prompt_len] = model.mask_id
    both = model(torch.cat([x, xu]), None, positions=torch.cat([positions, positions]))
    cond, un = both.chunk(2)
    return un + (cfg_scale + 1.0) * (cond - un)


@torch.no_grad()
def elbo_samples(model, context: Sequence[int], continuation: Sequence[int], num: int, batch_size: int, *,
                 cfg_scale: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` Monte-Carlo samples (float64, [num]) of the masked-diffusion lower bound on
    ``log p(continuation | context)``.

    A sample draws a number of masked tokens ``l`` uniform on ``1..L`` (``L = len(continuation)``),
    masks ``l`` continuation positions chosen uniformly at random (the context is never masked), and
    returns ``(L / l) * sum over the masked positions of log p_model(true token | masked sequence)``.
    Its expectation is LLaDA's bound ``E_l[(L / l) sum_masked log p]`` <= ``log p(continuation | context)``.
    Within a batch of ``batch_size`` samples the counts ``l`` are stratified (``_mask_counts``).
    Random numbers come from ``generator`` (a CPU generator; the global one when None).
    """
    ctx = [int(t) for t in context]
    cont = [int(t) for t in continuation]
    L, P = len(cont), len(ctx)
    if L == 0:
        return torch.zeros(num, dtype=torch.float64)
    device = model.device
    seq = torch.as_tensor(ctx + cont, dtype=torch.long)
    target = seq[P:]
    out = []
    done = 0
    while done < num:
        b = min(batch_size, num - done)
        counts = _mask_counts(L, b, generator)
        ranks = torch.rand((b, L), generator=generator).argsort(dim=1).argsort(dim=1)
        masked = ranks < counts[:, None]                               # [b, L], counts[i] True per row
        x = seq.repeat(b, 1)
        x[:, P:] = torch.where(masked, torch.full_like(x[:, P:], model.mask_id), x[:, P:])
        positions = torch.zeros((b, P + L), dtype=torch.bool)
        positions[:, P:] = masked
        logits = _masked_logits(model, x.to(device), positions.to(device), P, cfg_scale)    # [N, V]
        tokens = target.expand(b, L)[masked].to(device)
        logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1).cpu()
        rows = masked.nonzero()[:, 0]
        per_sample = torch.zeros(b, dtype=torch.float64).index_add_(0, rows, logp)
        out.append(per_sample * L / counts.double())
        done += b
    return torch.cat(out)


def elbo_loglikelihood(model, context: Sequence[int], continuation: Sequence[int], mc_num: int = 128,
                       batch_size: int = 32, *, cfg_scale: float = 0.0,
                       generator: torch.Generator | None = None) -> float:
    """The Monte-Carlo estimate (mean of ``mc_num`` samples of ``elbo_samples``) of
    ``log p(continuation | context)``. A one-token continuation needs a single sample: with ``L = 1``
    every sample masks that token with weight 1 and equals its exact log-probability."""
    num = 1 if len(continuation) == 1 else mc_num
    return float(elbo_samples(model, context, continuation, num, batch_size, cfg_scale=cfg_scale,
                              generator=generator).mean())


# ---------------------------------------------------------------------------- model_args parsing
def _typed(name: str, value: Any, tp: Any) -> Any:
    """A ``model_args`` value (a string from the command line, or a Python value) as type ``tp``, read as a
    configuration field of that type is (``config.convert_value``: bool, int, float, str, ``X | None``,
    ``Literal``); a :class:`ModelArgsError` naming the argument if it cannot be."""
    try:
        return convert_value(value, tp, f"model_args: {name}")
    except ConfigError as e:
        raise ModelArgsError(str(e)) from None


def _parse_batch_size(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size=%s: automatic batch sizes are not supported; using %d", value, default)
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"batch_size={value!r} is not an integer") from None
    if n <= 0:
        raise ModelArgsError(f"batch_size must be positive, got {n}")
    return n


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


# ---------------------------------------------------------------------------- the lm-eval model
class DLMDistillLM(TemplateLM):
    """lm-eval model ``dlmdistill``: a masked-diffusion LM loaded with ``dlmdistill.load_model``.

    model_args (``key=value`` pairs; see docs/evaluation.md):
        pretrained:     run folder, local model folder or hub id (required).
        dtype:          ``auto`` (bfloat16 on CUDA, float32 otherwise), float32, bfloat16, float16.
        device:         lm-eval's ``--device`` (default ``cuda`` if available, else ``cpu``; a CUDA
                        device on a machine without one falls back to the CPU with a warning).
        batch_size:     prompts decoded together by ``generate_until`` (lm-eval's ``--batch_size``).
        gen_length, steps, block_length, temperature, remasking, cfg_scale and every other
        ``GenerationConfig`` field: the sampler settings (see docs/sampling.md).
        mc_num:         Monte-Carlo samples per ``loglikelihood`` request (default 128, as LLaDA).
        mc_batch_size:  samples per forward pass of the estimator (default 32).
        check_greedy:   compute ``is_greedy`` by a greedy decode of the continuation (default true).
        add_bos_token:  prepend the tokenizer's BOS token to every prompt (default false).
        max_length:     context limit in tokens (default: the model's ``max_position_embeddings``).
        seed:           seed of the estimator's and the sampler's random numbers (default 1234).
        ``tokenizer``, ``revision``, ``trust_remote_code``, ``mask_token``, ``shift_logits``,
        ``attn_implementation``, ``gguf_file``: passed to the loader (see ``ModelConfig``).
    """

    backend = "causal"

    def __init__(self, pretrained: str | None = None, *, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 mc_num: int = 128, mc_batch_size: int = 32, check_greedy: bool = True,
                 add_bos_token: bool = False, max_length: int | None = None, seed: int = 1234,
                 **kwargs: Any):
        super().__init__()
        from ..models.loading import ModelConfig

        if not pretrained:
            raise ModelArgsError("model_args: pretrained=PATH is required (a run folder, model folder or hub id)")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)} & _LOAD_FIELDS
        gen_kwargs, load_kwargs, unknown = {}, {}, []
        for k, v in kwargs.items():
            if k in _GEN_FIELDS:
                gen_kwargs[k] = v
            elif k in model_fields:
                load_kwargs[k] = v
            else:
                unknown.append(k)
        if unknown:
            accepted = sorted({"pretrained", "dtype", "device", "batch_size", "mc_num", "mc_batch_size", "check_greedy",
                               "add_bos_token", "max_length", "seed"} | set(_GEN_FIELDS)
                              | model_fields)
            raise ModelArgsError(f"model_args: unknown key(s) {', '.join(sorted(unknown))}; accepted: {', '.join(accepted)}")

        # ----- generation settings: the ones the user set, checked now
        hints = typing.get_type_hints(GenerationConfig)
        self._user_gen: dict[str, Any] = {k: _typed(k, v, hints.get(k, Any)) for k, v in gen_kwargs.items()}
        self.batch_size = _parse_batch_size(batch_size, GenerationConfig().batch_size)
        if "gen_length" in self._user_gen:
            self._check_gen_config(self._resolve_gen_config({}))

        self.mc_num = _typed("mc_num", mc_num, int)
        self.mc_batch_size = _typed("mc_batch_size", mc_batch_size, int)
        if self.mc_num <= 0 or self.mc_batch_size <= 0:
            raise ModelArgsError("model_args: mc_num and mc_batch_size must be positive")
        self.check_greedy = _typed("check_greedy", check_greedy, bool)
        self.add_bos_token = _typed("add_bos_token", add_bos_token, bool)
        self.seed = _typed("seed", seed, int)

        # ----- the model
        if device in (None, ""):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda:0 unless told otherwise
            log.warning("device=%s but CUDA is not available: using the CPU", device)
            device = "cpu"
        if dtype in (None, "auto"):
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ModelArgsError(f"model_args: dtype={dtype!r}; choose auto, float32, bfloat16 or float16")
        from .. import load_model

        self.pretrained = str(pretrained)
        try:
            model, tok = load_model(self.pretrained, dtype=dtype, **load_kwargs)
        except (OSError, ValueError) as e:
            raise ModelArgsError(f"model_args: pretrained={self.pretrained}: could not load the model: {e}") from e
        self.model = model.to(device).eval()
        self.tokenizer = tok
        self._device = torch.device(device)
        limit = max_length if max_length is not None else getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = _typed("max_length", limit, int) if limit is not None else None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.eos_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer(string, add_special_tokens=False).input_ids
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelArgsError(f"--apply_chat_template: the tokenizer of {self.pretrained} has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        out = []
        for (pair, context, continuation) in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = list(context), list(continuation)
            if self.max_length is not None and len(context) + len(continuation) > self.max_length:
                if len(continuation) >= self.max_length:
                    raise ValueError(f"a continuation has {len(continuation)} tokens, more than max_length="
                                     f"{self.max_length} allows")
                keep = self.max_length - len(continuation)
                self._warn_once("ll_trunc", "loglikelihood: contexts longer than max_length=%d are left-truncated",
                                self.max_length)
                context = context[-keep:]
            logp = elbo_loglikelihood(self.model, context, continuation, self.mc_num, self.mc_batch_size,
                                      cfg_scale=float(self._user_gen.get("cfg_scale", 0.0)),
                                      generator=self._generator)
            greedy = self._is_greedy(context, continuation) if self.check_greedy else False
            out.append((logp, greedy))
            self.cache_hook.add_partial("loglikelihood", pair, (logp, greedy))
        return out

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether greedy decoding of ``len(continuation)`` tokens after ``context``, one token per step
        (low-confidence remasking, temperature 0), gives exactly ``continuation``."""
        n = len(continuation)
        if n == 0:
            return True
        cfg = GenerationConfig(gen_length=n, steps=n, block_length=None, temperature=0.0,
                               remasking="low_confidence", cfg_scale=float(self._user_gen.get("cfg_scale", 0.0)),
                               batch_size=1)
        res = generate(self.model, [context], cfg)
        return res.responses[0].tolist() == continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "dlmdistill's lm-eval model does not compute rolling log-likelihoods (perplexity tasks such as "
            "wikitext): a masked-diffusion model gives only a Monte-Carlo lower bound per continuation, not "
            "the token-by-token chain-rule likelihood these tasks assume. Use generate_until or "
            "multiple-choice (loglikelihood) tasks.")

    # ------------------------------------------------------------------ generation
    def _resolve_gen_config(self, gen_kwargs: dict[str, Any]) -> GenerationConfig:
        """The sampler settings of a request: model_args the user set win; otherwise ``max_gen_toks``
        gives ``gen_length`` (rounded up to a multiple of ``block_length``) and the task's
        ``temperature`` (0 when ``do_sample`` is false) gives ``temperature``; ``steps`` defaults to
        ``gen_length`` (one token per step)."""
        values = dict(self._user_gen)
        block = values.get("block_length")
        if "gen_length" not in values:
            n = int(gen_kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
            if block:
                n = math.ceil(n / block) * block
            values["gen_length"] = n
        if "temperature" not in values:
            t = gen_kwargs.get("temperature", 0.0)
            if gen_kwargs.get("do_sample") is False:
                t = 0.0
            values["temperature"] = float(t or 0.0)
        values.setdefault("steps", values["gen_length"])
        values["batch_size"] = self.batch_size
        return GenerationConfig(**values)

    def _check_gen_config(self, cfg: GenerationConfig, gen_kwargs: dict[str, Any] | None = None) -> None:
        try:
            cfg.validate()
        except ValueError as e:
            hint = ""
            if gen_kwargs is not None and "gen_length" not in self._user_gen:
                hint = (f" (gen_length {cfg.gen_length} came from the task's max_gen_toks="
                        f"{gen_kwargs.get('max_gen_toks', DEFAULT_MAX_GEN_TOKS)}; set gen_length in model_args to fix it)")
            raise ModelArgsError(f"model_args: {e}{hint}") from None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        groups: dict[tuple, list[int]] = {}
        configs: dict[tuple, GenerationConfig] = {}
        prompts: list[list[int]] = []
        stops: list[list[str]] = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            stops.append(list(until))
            cfg = self._resolve_gen_config(gen_kwargs)
            self._check_gen_config(cfg, gen_kwargs)
            key = tuple(sorted(dataclasses.asdict(cfg).items()))
            configs[key] = cfg
            groups.setdefault(key, []).append(i)
            prompts.append(self.tok_encode(context))

        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", unit="prompt", disable=disable_tqdm)
        for key, idx in groups.items():
            cfg = configs[key]
            idx = sorted(idx, key=lambda j: -len(prompts[j]))  # similar lengths together: less padding
            batch = [self._fit_prompt(prompts[j], cfg.gen_length) for j in idx]
            # a fresh sampler generator per batch
            for chunk, responses, _ in generate_batches(self.model, batch, cfg, generator=self._sampler_generator):
                for j, text in zip((idx[c] for c in chunk), self._decode(responses)):
                    text = self._strip_special(_cut_at_stops(text, stops[j]))
                    results[j] = text
                    self.cache_hook.add_partial("generate_until", requests[j].args, text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    def _sampler_generator(self) -> torch.Generator | None:
        dev = self.model.device
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        return torch.Generator(device=dev).manual_seed(seed)

    def _fit_prompt(self, ids: list[int], gen_length: int) -> list[int]:
        if self.max_length is None or len(ids) + gen_length <= self.max_length:
            return ids
        keep = self.max_length - gen_length
        if keep <= 0:
            raise ModelArgsError(f"gen_length={gen_length} leaves no room for a prompt within max_length={self.max_length}")
        self._warn_once("gen_trunc", "generate_until: prompts longer than max_length - gen_length = %d tokens are "
                        "left-truncated", keep)
        return ids[-keep:]

    def _decode(self, responses: torch.Tensor) -> list[str]:
        """Decode [B, G] responses up to the first EOS, keeping special tokens (a stop string may be one)."""
        out = []
        eos = self.eot_token_id
        for row in responses.tolist():
            if eos in row:
                row = row[:row.index(eos)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=False))
        return out

    def _strip_special(self, text: str) -> str:
        """Drop special-token strings (mask, padding, ...) left in a decoded response."""
        for tok in sorted(getattr(self.tokenizer, "all_special_tokens", []) or [], key=len, reverse=True):
            if tok:
                text = text.replace(tok, "")
        return text


def register() -> None:
    """Register ``DLMDistillLM`` under the name ``dlmdistill`` (idempotent)."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models stay available beside ours)
    from lm_eval.api.registry import model_registry

    if model_registry.get(MODEL_NAME, None) is not DLMDistillLM:
        register_model(MODEL_NAME)(DLMDistillLM)


def cli_evaluate(argv: Sequence[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``dlmdistill`` model registered; bad model_args end with a
    one-line error (exit status 2) instead of a traceback."""
    from lm_eval.__main__ import cli_evaluate as _cli

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        _cli()
    except ModelArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    # ``python -m dlmdistill.integrations.lm_eval``: use the importable module (not this __main__
    # copy) so that the registered class is the one users import.
    from dlmdistill.integrations.lm_eval import cli_evaluate as _main

    _main()
else:
    register()
