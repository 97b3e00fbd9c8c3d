"""Propagate channel spaces through every op of the captured aten graph.

Each fx node gets, per tensor dim, a layout (see :mod:`depgraph.layout`); ``None`` for size-1 dims.
Rules (one per op family, in :mod:`depgraph.rules`) say how an op's output dims relate to its input
dims. An op without a rule blocks every space it touches and is reported with its module path, so it
can never produce a wrong group.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .capture import Capture
from .errors import UnsupportedOpError
from .layout import SpaceStore, Unifiable
from .rules import RULES, op_name


@dataclass
class AttentionSite:
    """One attention call: the layout of its query-head dim and where it happens."""

    heads: object  # layout of q's head dim
    num_heads: int
    num_kv_heads: int
    head_dim: int
    module: str


@dataclass
class Note:
    op: str
    module: str
    message: str

    def __str__(self) -> str:
        return f"{self.op} at {self.module or '<root>'}: {self.message}"


@dataclass
class DimFlow:
    """The result of the propagation: spaces, parameter layouts, attention sites and notes."""

    store: SpaceStore
    param_layouts: dict  # canonical tensor name -> tuple of layouts, one per dim
    buffer_names: set
    attention: list
    unsupported: list  # Notes for ops without a rule that touched a channel space
    notes: list  # other places where spaces had to be blocked


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "")


@dataclass
class Ctx:
    """What a rule sees: the node, its inputs' layouts and helpers that never raise."""

    flow: "_Runner"
    node: torch.fx.Node
    op: str
    where: str

    @property
    def store(self) -> SpaceStore:
        return self.flow.store

    def arg(self, i: int, name: str, default=None):
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def is_tensor(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)

    def lay(self, a) -> tuple:
        return self.flow.env[a]

    def shape(self, a) -> tuple:
        if isinstance(a, torch.fx.Node):
            return tuple(int(s) for s in a.meta["val"].shape)
        return ()

    @property
    def out_val(self):
        return self.node.meta.get("val")

    @property
    def out_shape(self) -> tuple:
        return tuple(int(s) for s in self.node.meta["val"].shape)

    def is_parameter(self, node) -> bool:
        """Is ``node`` the placeholder of a model parameter (not a buffer, not an input)?"""
        return isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in self.flow.cap.params

    def reason(self, message: str) -> str:
        return f"{message} ({self.op} at {self.where or '<root>'})"

    def fresh(self, shape, why: str | None = None, broadcast: bool = False) -> tuple:
        """New spaces for a tensor of ``shape``; blocked with ``why`` unless None."""
        return tuple(self.store.new(n, self.reason("created"), blocked=why and self.reason(why),
                                    broadcast=broadcast) for n in shape)

    def unify(self, a, b) -> None:
        try:
            self.store.unify(a, b)
        except Unifiable as e:
            self.block(a, str(e))
            self.block(b, str(e))
            self.flow.notes.append(Note(self.op, self.where, str(e)))

    def block(self, layout, why: str) -> None:
        if layout is not None:
            self.store.block(layout, self.reason(why))

    def inexact(self, layout, why: str) -> None:
        if layout is not None:
            self.store.mark_inexact(layout, self.reason(why))

    def split(self, layout, sizes):
        try:
            return self.store.split(layout, sizes)
        except Unifiable as e:
            self.block(layout, str(e))
            self.flow.notes.append(Note(self.op, self.where, str(e)))
            return None

    def slice(self, layout, start, stop):
        try:
            return self.store.slice(layout, start, stop)
        except Unifiable as e:
            self.block(layout, str(e))
            self.flow.notes.append(Note(self.op, self.where, str(e)))
            return None

    def attention_site(self, heads, num_heads, num_kv_heads, head_dim) -> None:
        self.flow.attention.append(AttentionSite(heads, num_heads, num_kv_heads, head_dim, self.where))


class _Runner:
    def __init__(self, cap: Capture, strict: bool):
        self.cap = cap
        self.strict = strict
        self.store = SpaceStore()
        self.env: dict = {}
        self.param_layouts: dict = {}
        self.attention: list = []
        self.unsupported: list = []
        self.notes: list = []

    def run(self) -> DimFlow:
        for node in self.cap.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self._placeholder(node)
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                self._output(node)
            else:
                self.env[node] = None
        return DimFlow(self.store, self.param_layouts, set(self.cap.buffers.values()), self.attention,
                       self.unsupported, self.notes)

    def _placeholder(self, node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        shape = tuple(int(s) for s in val.shape)
        if node.name in self.cap.params:
            name = self.cap.params[node.name]
            if name not in self.param_layouts:  # tied placeholders share one set of spaces
                self.param_layouts[name] = tuple(self.store.new(n, f"{name}[{d}]") for d, n in enumerate(shape))
            return self.param_layouts[name]
        if node.name in self.cap.buffers:
            name = self.cap.buffers[node.name]
            why = None if name in self.cap.persistent_buffers else \
                f"coupled to non-persistent buffer {name} (recomputed from the config)"
            lays = tuple(self.store.new(n, f"{name}[{d}]", blocked=why) for d, n in enumerate(shape))
            self.param_layouts[name] = lays
            return lays
        kind = "model input" if node.name not in self.cap.program.graph_signature.inputs_to_lifted_tensor_constants \
            else "constant tensor"
        return tuple(self.store.new(n, f"{node.name}[{d}]", blocked=f"{kind} {node.name} dim {d}")
                     for d, n in enumerate(shape))

    def _call(self, node):
        if node.target is operator.getitem:  # multi-output ops give a list of layout tuples
            src = self.env.get(node.args[0])
            return src[node.args[1]] if isinstance(src, list) else None
        name = op_name(node.target)
        ctx = Ctx(self, node, name, module_path(node))
        rule = RULES.get(name)
        if rule is None:
            return self._no_rule(ctx)
        return rule(ctx)

    def _no_rule(self, ctx: Ctx):
        touched = False
        for a in ctx.node.all_input_nodes:
            lays = self.env.get(a)
            for lay in _flatten_layouts(lays):
                if lay is not None and any(not s.blocked for s in self.store.leaves(lay)):
                    touched = True
                ctx.block(lay, "op has no dimension rule")
        if touched:
            note = Note(ctx.op, ctx.where, "op has no dimension rule; its channel spaces are unprunable")
            if self.strict:
                raise UnsupportedOpError(str(note))
            self.unsupported.append(note)
        return _fresh_like(ctx, ctx.out_val, "output of an op with no dimension rule")

    def _output(self, node):
        for a in node.all_input_nodes:
            for lay in _flatten_layouts(self.env.get(a)):
                if lay is not None:
                    self.store.block(lay, f"model output {a.name}")


def _flatten_layouts(lays) -> list:
    """Layouts of a tensor (a tuple) or of a multi-output op (a list of tuples), flattened."""
    if lays is None:
        return []
    if isinstance(lays, tuple):
        return list(lays)
    return [lay for e in lays for lay in _flatten_layouts(e)]


def _fresh_like(ctx: Ctx, val, why):
    if isinstance(val, torch.Tensor):
        return ctx.fresh(tuple(int(s) for s in val.shape), why)
    if isinstance(val, (list, tuple)):
        return [_fresh_like(ctx, v, why) for v in val]
    return None


def propagate(cap: Capture, strict: bool = False) -> DimFlow:
    """Run every op rule over the captured graph."""
    return _Runner(cap, strict).run()
