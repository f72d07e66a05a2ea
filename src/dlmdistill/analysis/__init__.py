"""Analyses of trained models that are not training: d-OPSD's toy verification and teacher overlap."""

from .dopsd import compare_teacher_overlap, content_reveal, pass_at_k, self_teacher_check

__all__ = ["compare_teacher_overlap", "content_reveal", "pass_at_k", "self_teacher_check"]
