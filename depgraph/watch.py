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

import torch
from torch.overrides import TorchFunctionMode

from .callargs import call_leaves
from .capture import Capture, capture
from .tags import tag_attributes, tag_size, untag_attributes

_TORCH_DIR = os.path.dirname(torch.__file__)
SIZE_GETTERS = (torch.Tensor.size, torch.Tensor.shape.__get__)


class Call:
    """One torch call seen by the mode: ``func``, its ``name``, ``args``, ``kwargs``, ``walked``
    (:func:`depgraph.callargs.call_leaves`: every leaf once, for every recorder) and (computed on first use)
    ``frames``, the model code making it."""

    __slots__ = ("func", "name", "args", "kwargs", "walked", "_frame", "_outer", "_frames")

    def __init__(self, func, args, kwargs, frame, outer=frozenset()):
        self.func, self.args, self.kwargs, self._frame, self._outer = func, args, kwargs, frame, outer
        self.name = getattr(func, "__name__", "")
        self.walked = call_leaves(args, kwargs)
        self._frames = None

    @property
    def frames(self) -> list:
        """(file, line) of every frame outside torch above the mode, innermost first, up to the frames that were
        on the stack when the export began (``outer``): the model code making the call."""
        if self._frames is None:
            out, outer = [], self._outer
            f = self._frame.f_back
            while f is not None and id(f) not in outer:
                name = f.f_code.co_filename
                if not name.startswith(_TORCH_DIR):
                    out.append((name, f.f_lineno))
                f = f.f_back
            self._frames = out
        return self._frames


class Watch(TorchFunctionMode):
    """Feeds every torch call of one export to ``recorders``; with ``sizes``, tags the sizes tensors report."""

    def __init__(self, recorders, sizes: bool = True):
        super().__init__()
        self.recorders, self.sizes = tuple(recorders), sizes
        self.outer = None  # ids of the frames on the stack when the mode was first entered (whatever runs the
        # export; alive, so their ids are theirs, until the export returns)

    def __enter__(self):
        if self.outer is None:
            self.outer, f = set(), inspect.currentframe().f_back
            while f is not None:
                self.outer.add(id(f))
                f = f.f_back
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.sizes and func in SIZE_GETTERS and args and isinstance(args[0], torch.Tensor):
            out = tag_size(args[0], func(*args, **kwargs), args[1:], kwargs)
            for r in self.recorders:
                r.sized(args[0])
            return out
        call = Call(func, args, kwargs, inspect.currentframe(), self.outer or frozenset())
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
