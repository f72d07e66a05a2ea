"""dlmdistill: post-training diffusion language models with self-distillation.

Python API (mirrors the command line)::

    import dlmdistill as dd
    dd.train("sft", "configs/sft_countdown_tiny.yaml", max_steps=200)
    model, tokenizer = dd.load_model("runs/sft_countdown/final")
    dd.generate((model, tokenizer), ["numbers: 3 5 7 target: 22\\n"], gen_length=64, steps=32)
    dd.evaluate("runs/sft_countdown", task="countdown", steps=[8, 16], seeds=[10])
"""

__version__ = "0.1.0"

import logging as _logging


class _NoKernelHubNotice(_logging.Filter):
    """bitsandbytes, when installed, tries at import to fetch a faster CPU kernel from the Hugging Face Hub and
    warns when it cannot (offline, or a publisher it cannot verify), then uses its own kernel: a notice that
    every run would print although nothing is wrong (peft imports bitsandbytes whenever it is installed)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubNotice())

from .api import evaluate, generate, make_config, train  # noqa: E402
from .errors import UserError  # noqa: E402

# The evaluation code lives in ``dlmdistill.evaluation``: a submodule named ``evaluate`` would replace
# the API function ``dlmdistill.evaluate`` as soon as anything imported it.


def load_model(name_or_path: str, **kwargs):
    """``(DiffusionModel, tokenizer)`` from a run folder, a local folder or a hub id."""
    from .evaluation import resolve_model_path
    from .models.loading import load_model as _load

    return _load(resolve_model_path(name_or_path), **kwargs)


__all__ = ["train", "generate", "evaluate", "load_model", "make_config", "UserError", "__version__"]
