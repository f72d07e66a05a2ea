"""dlmdistill: post-training diffusion language models with self-distillation.

Python API (mirrors the command line)::

    import dlmdistill as dd
    dd.train("sft", "configs/sft_countdown_tiny.yaml", max_steps=200)
    model, tokenizer = dd.load_model("runs/sft_countdown/final")
    dd.generate((model, tokenizer), ["numbers: 3 5 7 target: 22\\n"], gen_length=64, steps=32)
    dd.evaluate("runs/sft_countdown", task="countdown", steps=[8, 16], seeds=[10])
"""

__version__ = "0.1.0"

import sys as _sys
import types as _types

from .api import evaluate, generate, make_config, train  # noqa: E402
from .errors import UserError  # noqa: E402


class _Package(_types.ModuleType):
    """``dlmdistill.evaluate`` is both the API function above and the submodule ``dlmdistill/evaluate.py``.
    Importing a submodule makes Python set it as an attribute of its package, which would replace the
    function (``dd.evaluate(...)`` -> "'module' object is not callable"). The package keeps the function:
    the submodule stays importable (``from dlmdistill.evaluate import evaluate_model``) and is always in
    ``sys.modules["dlmdistill.evaluate"]``; only the attribute ``dlmdistill.evaluate`` is the function
    (so ``import dlmdistill.evaluate as m``, which reads that attribute, gives the function: use
    ``from dlmdistill.evaluate import NAME`` or ``importlib.import_module("dlmdistill.evaluate")``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_API = frozenset({"train", "generate", "evaluate", "load_model", "make_config"})
_sys.modules[__name__].__class__ = _Package


def load_model(name_or_path: str, **kwargs):
    """``(DiffusionModel, tokenizer)`` from a run folder, a local folder or a hub id."""
    from .evaluate import resolve_model_path
    from .models.loading import load_model as _load

    return _load(resolve_model_path(name_or_path), **kwargs)


__all__ = ["train", "generate", "evaluate", "load_model", "make_config", "UserError", "__version__"]
