"""Elementwise ops on complex tensors (RoPE as a complex rotation, e.g. DeepSeek-V2): ``polar`` builds the
rotation, ``real``/``imag``/``conj`` read it; ``view_as_complex``/``view_as_real`` are shape rules."""
from __future__ import annotations

from . import rule
from .elementwise import elementwise

rule("polar", "complex", "real", "imag", "conj", "_conj", "resolve_conj", "angle")(elementwise)
