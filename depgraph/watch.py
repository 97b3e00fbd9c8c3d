"""One export of a model watched by recorders: one torch-function mode over the capture, feeding each of them.

A recorder is any object with the methods ``sized(t)`` (the sizes of tensor ``t`` were read; with ``sizes`` on,
the caller got them tagged, :func:`depgraph.tags.tag_size`), ``before(call)`` and ``after(call, out)`` around every
other torch call (:class:`Call`). The mode is the only frame between the model code and the recorders, so every
recorder sees the same model lines (:attr:`Call.frames`).
"""
from __future__ import annotations

import inspect
import logging
import os
from functools import cached_property

import torch
from torch.overrides import TorchFunctionMode

from .callargs import leaves
from .capture import Capture, capture
from .tags import tag_attributes, tag_size, untag_attributes

_TORCH_DIR = os.path.dirname(torch.__file__)
SIZE_GETTERS = (torch.Tensor.size, torch.Tensor.shape.__get__)


class Call:
    """One torch call seen by the mode: ``func``, its ``name``, ``args``, ``kwargs``, and (computed on first use)
    the model code making it."""

    def __init__(self, func, args, kwargs, frame):
        self.func, self.args, self.kwargs, self._frame = func, args, kwargs, frame
        self.name = getattr(func, "__name__", "")

    @cached_property
    def walked(self) -> list:
        """:func:`depgraph.callargs.leaves` of ``(args, kwargs)``: every leaf once, for every recorder."""
        return leaves((self.args, self.kwargs))

    @cached_property
    def frames(self) -> list:
        """(file, line) of every frame outside torch above the mode, innermost first: the model code making the
        call (then whatever called the export)."""
        out = []
        f = self._frame.f_back
        while f is not None:
            name = f.f_code.co_filename
            if not name.startswith(_TORCH_DIR):
                out.append((name, f.f_lineno))
            f = f.f_back
        return out


class Watch(TorchFunctionMode):
    """Feeds every torch call of one export to ``recorders``; with ``sizes``, tags the sizes tensors report."""

    def __init__(self, recorders, sizes: bool = True):
        super().__init__()
        self.recorders, self.sizes = tuple(recorders), sizes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.sizes and func in SIZE_GETTERS and args and isinstance(args[0], torch.Tensor):
            out = tag_size(args[0], func(*args, **kwargs), args[1:], kwargs)
            for r in self.recorders:
                r.sized(args[0])
            return out
        call = Call(func, args, kwargs, inspect.currentframe())
        for r in self.recorders:
            r.before(call)
        out = func(*args, **kwargs)
        for r in self.recorders:
            r.after(call, out)
        return out


def watched(model, example_inputs, recorders, sizes: bool = True, attributes="all") -> Capture | None:
    """One export of ``model``'s meta twin under a :class:`Watch` of ``recorders``, with the int attributes of its
    modules tagged (all of them, those at the paths ``attributes``, or none for None) and put back as plain ints
    after; None when that export fails (no evidence: whatever it was to prove stays unproved)."""
    def prepare(twin):
        if attributes is not None:
            tag_attributes(twin, None if attributes == "all" else attributes)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the forward may break under tagged sizes; torch logs that loudly
    try:
        cap = capture(model, example_inputs, prepare=prepare, mode=Watch(recorders, sizes))
    except Exception:  # noqa: BLE001 - no evidence
        return None
    finally:
        quiet.setLevel(level)
    untag_attributes(cap.module)
    return cap
