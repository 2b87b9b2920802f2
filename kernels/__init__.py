"""Sequence-mixing ops: uniform [B, T, H, D] signatures, a naive reference beside each fast path."""

from .gka import gka
from .gla import gla

__all__ = ["gka", "gla"]
