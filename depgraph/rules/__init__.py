"""Dimension rules, one small function per op family, registered by aten op name.

A rule receives a :class:`depgraph.dimflow.Ctx` and returns the output's layouts: a tuple (one layout
per dim, ``None`` for size-1 dims) for a tensor, a list of such tuples for a multi-output op, or
``None`` for an op with no tensor output. Rules know only their op's schema, never an architecture.
"""
from __future__ import annotations

RULES: dict = {}


class RuleError(Exception):
    """A rule cannot read its op (unknown argument, symbolic size, unexpected signature): the op then
    blocks every space it touches, like an op without a rule."""


def rule(*names: str):
    """Register ``fn`` for the given aten op names (``"linear"`` means ``aten::linear``, any overload)."""
    def register(fn):
        for n in names:
            if n in RULES:
                raise ValueError(f"two rules for aten::{n}")
            RULES[n] = fn
        return fn
    return register


def op_name(target) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::", 1)[-1]
    return getattr(target, "__name__", str(target))


from . import attention, complex, control, conv, creation, elementwise, linear, moe, norm, shape  # noqa: E402,F401  (registration)
