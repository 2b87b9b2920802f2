"""Sequence-mixing ops: uniform [B, T, H, D] signatures, a naive reference beside each fast path."""

from .conv import short_conv
from .delta import delta_rule
from .gka import gka
from .gla import gla
from .mesa import mesa

__all__ = ["delta_rule", "gka", "gla", "mesa", "short_conv"]
