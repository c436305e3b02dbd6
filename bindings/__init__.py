"""Compiled (Cython) helpers used on every call's hot path."""
