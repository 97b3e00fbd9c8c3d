"""Errors raised by depgraph. Every message names the problem: the op, module path or parameter."""


class DepgraphError(Exception):
    """Base class of every error depgraph raises on bad input."""


class TraceError(DepgraphError):
    """The model could not be captured or analysed."""


class UnsupportedOpError(TraceError):
    """An op without a dimension rule touched a channel space (raised only with ``strict=True``)."""


class PlanError(DepgraphError):
    """A plan is not legal for its graph (unknown group, index out of range, GQA rule, emptied layer)."""


class LoadError(DepgraphError):
    """A saved pruned-model folder is missing files or does not match its recorded shapes."""


class ShrinkVerifyError(DepgraphError):
    """``shrink(..., verify=True)`` found a shrunk model that differs from its mask (the model is restored)."""


class OutputError(DepgraphError):
    """An output folder cannot be written without losing data (a file there, the input model, a foreign folder)."""
