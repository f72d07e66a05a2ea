"""Analysis helpers that run a model outside a trainer (the papers' diagnostic experiments)."""

from .dopsd import compare_teacher_overlap, regenerate_from_self_teacher

__all__ = ["compare_teacher_overlap", "regenerate_from_self_teacher"]
