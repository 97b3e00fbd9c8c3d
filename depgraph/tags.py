"""Ints that remember where they came from, named as if only some of them had been tagged.

A :class:`Tagged` int has the value of a plain int and a provenance ``how``: a module attribute (``("attr", name,
module path)``), a size a tensor reported (``("size", "@ID:D")``: dim D of the tensor with id ID), or a product or
sum of ints one of which is tagged (``("mul", a, b)`` / ``("add", a, b)``, in Python's operand order). One export
with every attribute of every module and every reported size tagged then serves each recorder: :func:`name` gives
the name an int would have had in an export that tagged only the attributes of ``modules`` (and the sizes), by the
rules below, so a recorder sees exactly what its own export used to show it:

* an attribute is its name, a size its ``@ID:D``;
* a product names its factors (``num_heads*head_dim``, an untagged factor by its value: ``num_heads*64``) unless
  a factor is a sum;
* a sum of a tagged attribute and a positive untagged int names both (``num_heads+2``); when the left operand is
  tagged but cannot name the sum (it is a product or a size, or the right one is tagged too), the right one names
  it with the left's value (Python's fallback ``int(a) + b``; a product likewise);
* a reported size floor-divided by a positive untagged int names both (``@ID:D/2``: half of that dim); such a
  quotient names nothing made from it (a product or sum of it is a plain int);
* anything else (a difference, another quotient, a sum with a size on the right...) is a plain int: no name.
"""
from __future__ import annotations

import torch


class Tagged(int):
    """An int that remembers how it was made (``how``, see the module docstring)."""

    def __new__(cls, value: int, how: tuple):
        out = super().__new__(cls, value)
        out.how = how
        out.names = {}  # frozenset of modules -> name there (cached)
        return out

    def __mul__(self, other):
        if isinstance(other, int) and not isinstance(other, bool):
            return Tagged(int(self) * int(other), ("mul", self, other))
        return int(self) * other

    def __rmul__(self, other):
        if isinstance(other, int) and not isinstance(other, bool):
            return Tagged(int(other) * int(self), ("mul", other, self))
        return int(self) * other

    def __add__(self, other):
        if isinstance(other, int) and not isinstance(other, bool) and _attribute(self, other):
            return Tagged(int(self) + int(other), ("add", self, other))
        return int(self) + int(other) if isinstance(other, Tagged) else int(self) + other

    def __radd__(self, other):
        if isinstance(other, int) and not isinstance(other, bool) and _attribute(self, other):
            return Tagged(int(other) + int(self), ("add", other, self))
        return int(self) + other

    def __floordiv__(self, other):
        if type(other) is int and other > 0 and self.how[0] == "size":
            return Tagged(int(self) // other, ("div", self, other))
        return int(self) // other

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (Tagged, (int(self), self.how))


def _attribute(*vs) -> bool:
    """Whether one of ``vs`` is a tagged attribute itself: a sum is named only through one (the rules below), so
    any other sum is a plain int in every export."""
    return any(isinstance(v, Tagged) and v.how[0] == "attr" for v in vs)


def name(v, modules: frozenset = frozenset()) -> str | None:
    """The name of ``v`` in an export that tagged the attributes of ``modules`` only (and every reported size);
    None for an int that would have been plain there."""
    if not isinstance(v, Tagged):
        return None
    if modules not in v.names:
        v.names[modules] = _name(v.how, modules)
    return v.names[modules]


def _plain_int(v, modules) -> bool:
    """Whether ``v`` would be of type ``int`` itself there (an untagged int, or a tagged one without a name)."""
    return type(v) is int or isinstance(v, Tagged) and name(v, modules) is None


def _name(how: tuple, modules) -> str | None:
    kind = how[0]
    if kind == "size":
        return how[1]
    if kind == "attr":
        return how[1] if how[2] in modules else None
    if kind == "div":
        return f"{how[1].how[1]}/{how[2]}"
    a, b = how[1], how[2]
    na, nb = name(a, modules), name(b, modules)
    if na is not None:  # ``a.__op__(b)``, which falls back to ``int(a) op b``: ``b.__rop__(int(a))``
        out = _combined(kind, na, b, nb, modules)
        return out if out is not None or nb is None else _combined(kind, nb, int(a), None, modules)
    if nb is not None:  # ``b.__rop__(a)``: a is a plain int there
        return _combined(kind, nb, a, None, modules)
    return None


def _combined(kind: str, own: str, other, other_name, modules) -> str | None:
    """The name of a tagged int named ``own`` times / plus ``other`` (named ``other_name`` or untagged)."""
    if "/" in own + (other_name or ""):  # a quotient is named alone
        return None
    if kind == "mul":
        return None if "+" in own + (other_name or "") else \
            f"{own}*{other_name if other_name is not None else int(other)}"
    ok = other_name is None and _plain_int(other, modules) and int(other) > 0 and own.isidentifier()
    return f"{own}+{int(other)}" if ok else None


def sizes_in(v) -> set:
    """The ``@ID:D`` names of the reported sizes ``v`` was made from."""
    out, todo = set(), [v]
    while todo:
        x = todo.pop()
        if isinstance(x, Tagged):
            if x.how[0] == "size":
                out.add(x.how[1])
            elif x.how[0] in ("mul", "add", "div"):
                todo += [x.how[1], x.how[2]]
    return out


def tag_size(t: torch.Tensor, out, args, kwargs):
    """``t.size(...)`` / ``t.shape``'s result ``out`` with every size tagged ``@id(t):dim``."""
    if isinstance(out, int):
        d = (args[0] if args else kwargs.get("dim", 0)) % t.dim()
        return Tagged(out, ("size", f"@{id(t)}:{d}"))
    return torch.Size([Tagged(int(n), ("size", f"@{id(t)}:{d}")) for d, n in enumerate(out)])


def tag_attributes(twin: torch.nn.Module, paths=None) -> None:
    """Tag every int attribute of the modules of ``twin`` (of those at ``paths`` only, when given)."""
    for path, mod in twin.named_modules():
        if paths is None or path in paths:
            for key, v in list(vars(mod).items()):
                if type(v) is int:
                    setattr(mod, key, Tagged(v, ("attr", key, path)))


def untag_attributes(twin: torch.nn.Module) -> None:
    """Every tagged int attribute of ``twin``'s modules back to a plain int (after the export)."""
    for mod in twin.modules():
        for key, v in list(vars(mod).items()):
            if isinstance(v, Tagged):
                setattr(mod, key, int(v))
