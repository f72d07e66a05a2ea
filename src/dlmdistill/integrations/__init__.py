"""Adapters that plug dlmdistill models into other libraries (lm-evaluation-harness)."""
