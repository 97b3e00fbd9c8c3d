"""Which module attributes the forward passes, unchanged, to which line of model code.

Chosen int attributes of the meta twin are replaced by :class:`Tagged` ints (same value, same behaviour, a name
attached); a torch-function mode active during one export records, for every torch call whose arguments hold a
tagged int, the model-code line making the call and the ``(name, value)`` pairs it passed. A literal size in the
exported graph is then known to *be* that attribute when its op's line shows the pair; arithmetic on a tagged int
gives a plain int (except a product, which names its factors: ``num_heads*head_dim``), so a value computed
otherwise or read off a tensor's shape shows nothing.
"""
from __future__ import annotations

import inspect
import logging
import os
import re

import torch
from torch.overrides import TorchFunctionMode

from .capture import capture

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


class Tagged(int):
    """An int that remembers the attribute it was read from."""

    def __new__(cls, value: int, name: str):
        out = super().__new__(cls, value)
        out.attribute = name
        return out

    def __mul__(self, other):  # ``self.num_heads * self.head_dim``: the product remembers its factors
        if isinstance(other, int) and not isinstance(other, bool):
            return Tagged(int(self) * int(other), f"{self.attribute}*{getattr(other, 'attribute', int(other))}")
        return int(self) * other

    __rmul__ = __mul__

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (Tagged, (int(self), self.attribute))


def _tags(obj, out: set) -> None:
    if isinstance(obj, Tagged):
        out.add((obj.attribute, int(obj)))
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tags(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tags(o, out)
    elif isinstance(obj, slice):
        _tags((obj.start, obj.stop, obj.step), out)


def _caller_line():
    """(file, line) of the innermost frame outside torch: the model code making the call."""
    f = inspect.currentframe().f_back.f_back
    while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR):
        f = f.f_back
    return (f.f_code.co_filename, f.f_lineno) if f is not None else None


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found: set = set()
        _tags(args, found)
        _tags(kwargs, found)
        if found:
            self.reads.setdefault(_caller_line(), set()).update(found)
        return func(*args, **kwargs)


def tagged_reads(model, example_inputs, paths) -> dict | None:
    """{(file, line): {(attribute name, value)}} for one export of ``model`` with every int attribute of the
    modules at ``paths`` tagged; None when that export fails."""
    def tag(twin):
        for path, mod in twin.named_modules():
            if path in paths:
                for name, v in list(vars(mod).items()):
                    if type(v) is int:
                        setattr(mod, name, Tagged(v, name))
    rec = _Recorder()
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with rec:
            capture(model, example_inputs, prepare=tag)
    except Exception:  # noqa: BLE001 - no evidence: nothing is confirmed
        return None
    finally:
        quiet.setLevel(level)
    return rec.reads


def source_line(node):
    """(file, line) of the model code that emitted the fx ``node`` (its innermost recorded frame), or None."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return (frames[-1][0], int(frames[-1][1])) if frames else None
