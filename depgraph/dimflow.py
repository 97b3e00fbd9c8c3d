"""Propagate channel spaces through every op of the captured aten graph.

Each fx node gets, per tensor dim, a layout (see :mod:`depgraph.layout`); ``None`` for size-1 dims.
Rules (one per op family, in :mod:`depgraph.rules`) say how an op's output dims relate to its input
dims. An op without a rule blocks every space it touches and is reported with its module path, so it
can never produce a wrong group.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch

from .capture import Capture
from .errors import UnsupportedOpError
from .layout import Reason, SpaceStore, Unifiable
from .reads import source_line
from .rules import RULES, RuleError, op_name
from .rules.moe import routed, values_of


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
class LiteralSize:
    """A fixed size in an op's arguments that equals attributes of the modules running the op: pruning
    its space is exact only if the shrinker rewrites one of them (checked when groups are built)."""

    layout: object
    value: int
    attributes: list  # "module.path:attr" whose value equals the literal
    op: str
    module: str
    node: str = ""  # the fx node's name (to find it again in a re-export)
    strict: bool = False
    witnesses: list = field(default_factory=list)  # layouts of the module's inputs of that size: it may be their .size()
    source: tuple | None = None  # (file, line) of the model code emitting the op
    unread: bool = False  # set by graph.read_attributes: the literal did not follow its attribute when it changed
    proved: bool = False  # set by graph.read_attributes: every call making the op passed sizes read off its spaces
    passed: bool = False  # ... or passed an attribute of this module shrink rewrites (owned by its attention group)
    counted: bool = False  # proved as its module's head count plus fixed slots: owned only by that module's heads
    held: bool = False  # ... or passed its module's attribute that the module's fixer reads off a dim of this space
    width: bool = False  # ... or passed a width attribute (hidden_dim) of its module: owned via width_modules
    at: int | None = None  # its position among the op's int arguments, when the op names one size per piece

    def __str__(self) -> str:
        names = ", ".join(a.replace(":", ".") for a in self.attributes[:3]) or "no module attribute"
        return f"literal size {self.value} in aten.{self.op} at {self.module or '<root>'} (= {names})"


@dataclass
class DimFlow:
    """The result of the propagation: spaces, parameter layouts, attention sites and notes."""

    store: SpaceStore
    param_layouts: dict  # canonical tensor name -> tuple of layouts, one per dim
    buffer_names: set
    attention: list
    unsupported: list  # Notes for ops without a rule that touched a channel space
    notes: list  # other places where spaces had to be blocked
    literals: list = None  # LiteralSize records
    stale: set = None  # "path:attr" the forward reads that shrink does not rewrite (see graph.read_attributes)
    routing: list = field(default_factory=list)  # rules.moe.RoutingSite (mixture-of-experts top-k routing)
    aligned: list = field(default_factory=list)  # layouts grouped_mm needs in multiples of rules.moe.GROUPED_MM_ALIGN
    moe_modules: set = field(default_factory=set)  # module paths of top-k routing and the ops reading expert indices
    env: dict = field(default_factory=dict)  # fx node -> its dims' layouts (read by depgraph.blocks)
    pending: list = field(default_factory=list)  # fills.Pending: created dims blocked unless fills.prove proves them
    const_index: list = field(default_factory=list)  # indices.ConstIndex: dims read at positions indices.prove finds


class _NoRule(Exception):
    """Internal: the op has no dimension rule."""


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "")


_INDEX_LIKE = re.compile(r"(idx|index|_id)$")  # positions, not sizes: never the owner of a literal size


def static_shape(val, what: str) -> tuple:
    """Concrete sizes of a tensor's shape; a data-dependent (unbacked symbolic) size raises RuleError."""
    out = []
    for s in val.shape:
        try:
            out.append(int(s))
        except Exception as e:  # noqa: BLE001 - torch raises several types for unbacked sizes
            raise RuleError(f"data-dependent size {s} in the {what}") from e
    return tuple(out)


def _safe_size(s):
    try:
        return int(s)
    except Exception:  # noqa: BLE001
        return None


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
        """Argument ``name``, read by the op's schema (position, keyword or schema default); ``i`` and
        ``default`` are used only for targets without a schema. Raises :class:`RuleError` when the op
        has no such argument, so a rule never reads the wrong one."""
        schema = getattr(self.node.target, "_schema", None)
        if schema is None:
            if len(self.node.args) > i:
                return self.node.args[i]
            return self.node.kwargs.get(name, default)
        return self.arg_by_name(name)

    def arg_by_name(self, name: str):
        schema = self.node.target._schema
        for k, a in enumerate(schema.arguments):
            if a.name != name:
                continue
            if not a.kwarg_only and len(self.node.args) > k:
                return self.node.args[k]
            if name in self.node.kwargs:
                return self.node.kwargs[name]
            return a.default_value if a.has_default_value() else None
        raise RuleError(f"aten.{self.op} has no argument {name!r} (schema: {schema})")

    def has_arg(self, name: str) -> bool:
        schema = getattr(self.node.target, "_schema", None)
        return schema is not None and any(a.name == name for a in schema.arguments)

    def is_tensor(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)

    def lay(self, a) -> tuple:
        return self.flow.env[a]

    def shape(self, a) -> tuple:
        if isinstance(a, torch.fx.Node):
            return static_shape(a.meta["val"], f"input {a.name} of aten.{self.op}")
        return ()

    @property
    def out_val(self):
        return self.node.meta.get("val")

    @property
    def out_shape(self) -> tuple:
        return static_shape(self.node.meta["val"], f"output of aten.{self.op}")

    def is_parameter(self, node) -> bool:
        """Is ``node`` the placeholder of a model parameter (not a buffer, not an input)?"""
        return isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in self.flow.cap.params

    def parameter_name(self, node) -> str | None:
        """The model parameter's name behind the placeholder ``node`` (None when it is not a parameter)."""
        return self.flow.cap.params[node.name] if self.is_parameter(node) else None

    def reason(self, message: str, kind: str = "blocked") -> Reason:
        """``message`` about this op, as text ``"MESSAGE (OP at MODULE)"`` and as data (:class:`Reason`)."""
        return Reason(str(message), self.op, self.where or "", kind)

    def fresh(self, shape, why: str | None = None, broadcast: bool = False) -> tuple:
        """New spaces for a tensor of ``shape``; blocked with ``why`` unless None."""
        return tuple(self.store.new(n, self.reason("created", "origin"), blocked=why and self.reason(why),
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
            self.store.mark_inexact(layout, self.reason(why, "inexact"))

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

    def literal(self, layout, value, strict: bool = False, at: int | None = None) -> None:
        """Record that a prunable ``layout`` is sized by the literal ``value`` in this op's arguments.

        Every value is recorded, with the attributes it equals and ``witnesses`` (dims of that size of tensors
        entering the module, whose ``.size()`` it may be): graph.read_attributes then checks what the forward
        passed there (a rewritten attribute, or the very dims of the tensor it reshapes); a literal it cannot prove
        blocks its space. ``strict``: a split size or slice offset (a merge's size is often read off the tensor);
        ``at``: the value's position among the op's int arguments (a split's sizes: one per piece)."""
        if layout is None or not isinstance(value, int) or isinstance(value, bool) or value in (-1, 0):
            return
        attrs = self.flow.attributes_equal_to(self.node, value)
        seen = self.flow.inputs_of_size(self.where, layout, value)
        self.flow.literals.append(LiteralSize(layout, value, attrs, self.op, self.where, self.node.name, strict,
                                              seen, source_line(self.node), at=at))

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
        self.literals: list = []
        self._attr_cache: dict = {}
        self.input_spaces: list = []  # spaces of the model inputs' dims (batch, sequence)
        self.routing: list = []
        self.aligned: list = []
        self.moe_modules: set = set()
        self.values: dict = {}  # node or (node, output index) -> ExpertValues (tensors of expert indices)
        self.outer: dict = {}  # placeholder of a higher-order op's body -> the op's argument it stands for
        self.module_inputs: dict = {}  # module path -> size -> layouts of tensors entering it from outside
        self._paths: dict = {}  # node -> its module path
        self.pending: list = []  # fills.Pending records
        self.const_index: list = []  # indices.ConstIndex records

    def inputs_of_size(self, where: str, layout, value: int) -> list:
        """Layouts of size ``value`` of tensors entering module ``where`` from outside it (activations and
        parameters seen so far), sharing no space with ``layout`` and not a model input's batch/sequence dim: a
        literal equal to one may have been read off that tensor's shape (``b, t, e = x.size()``)."""
        mine = set(self.store.leaves(layout))
        inputs = set(self.input_spaces)
        out = []
        for lay in self.module_inputs.get(where, {}).get(value, ()):
            leaves = set(self.store.leaves(lay))
            if leaves and not leaves & mine and not leaves <= inputs:
                out.append(lay)
        return out

    def _remember_inputs(self, node) -> None:
        """File the layouts of ``node``'s inputs made outside its module (and outside each enclosing module)."""
        parts = module_path(node).split(".") if module_path(node) else []
        scopes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # the module and every enclosing one
        for a in node.all_input_nodes:
            lays = self.env.get(a)
            if lays is None:
                continue
            src = self._paths.setdefault(a, module_path(a) if a.op == "call_function" else "")
            for scope in scopes:
                if src == scope or src.startswith(scope + "."):
                    continue
                sizes = self.module_inputs.setdefault(scope, {})
                for lay in _flatten_layouts(lays):
                    if lay is not None:
                        bucket = sizes.setdefault(self.store.expand(lay).size, [])
                        if len(bucket) < 16 and all(lay is not x for x in bucket):
                            bucket.append(lay)

    def attributes_equal_to(self, node, value: int) -> list:
        """``path:attr`` of the int attributes equal to ``value`` on the modules running ``node``."""
        root = self.cap.module
        if root is None:
            return []
        prefix = module_path(node)  # the module whose forward runs the op
        out = []
        for prefix in (prefix,):
            if prefix not in self._attr_cache:
                try:
                    mod = root.get_submodule(prefix)
                    self._attr_cache[prefix] = {a: v for a, v in vars(mod).items()
                                                if isinstance(v, int) and not isinstance(v, bool)
                                                and not _INDEX_LIKE.search(a)}
                except (AttributeError, TypeError):
                    self._attr_cache[prefix] = {}
            out += [f"{prefix}:{a}" for a, v in self._attr_cache[prefix].items() if v == value]
        return out

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
                       self.unsupported, self.notes, self.literals,
                       routing=self.routing, aligned=self.aligned, moe_modules=self.moe_modules, env=self.env,
                       pending=self.pending, const_index=self.const_index)

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
        lays = tuple(self.store.new(n, f"{node.name}[{d}]", blocked=f"{kind} {node.name} dim {d}")
                     for d, n in enumerate(shape))
        if kind == "model input":
            self.input_spaces.extend(s for s in lays if s is not None)
        return lays

    def _call(self, node):
        if node.target is operator.getitem:  # multi-output ops give a list of layout tuples
            src = self.env.get(node.args[0])
            return src[node.args[1]] if isinstance(src, list) else None
        ctx = Ctx(self, node, op_name(node.target), module_path(node))
        self._remember_inputs(node)
        try:  # ops reading expert indices go through rules.moe first
            out = routed(ctx, self._rule)
            _check_output(self.store, out, ctx.out_val)
            return out
        except _NoRule as e:
            return self._no_rule(ctx, str(e))
        except (RuleError, Unifiable, IndexError, KeyError, TypeError, ValueError, AttributeError,
                ZeroDivisionError, AssertionError, RuntimeError) as e:
            if self.strict:
                raise UnsupportedOpError(f"rule for aten.{ctx.op} at {ctx.where or '<root>'} failed: "
                                         f"{type(e).__name__}: {e}") from e
            return self._no_rule(ctx, f"its dimension rule could not read the op ({type(e).__name__}: {e})")

    def _rule(self, ctx: Ctx):
        rule = RULES.get(ctx.op)
        if rule is None:
            raise _NoRule("op has no dimension rule")
        return rule(ctx)

    def _no_rule(self, ctx: Ctx, why: str):
        touched = False
        for a in ctx.node.all_input_nodes:
            lays = self.env.get(a)
            for lay in _flatten_layouts(lays):
                if lay is not None and any(not s.blocked for s in self.store.leaves(lay)):
                    touched = True
                ctx.block(lay, why)
        if touched:
            note = Note(ctx.op, ctx.where, f"{why}; its channel spaces are unprunable")
            if self.strict:
                raise UnsupportedOpError(str(note))
            self.unsupported.append(note)
        return _fresh_like(ctx, ctx.out_val, f"output of an op whose {why[3:] if why.startswith('op ') else why}")

    def run_subgraph(self, graph: torch.fx.Graph, inputs: list, outer: list | None = None) -> list:
        """Propagate through a nested graph (a higher-order op's body); returns its outputs' layouts.
        ``outer``: the op's arguments behind ``inputs`` (body placeholders then stand for them in
        ``self.outer``, and expert values flow in)."""
        phs = [n for n in graph.nodes if n.op == "placeholder"]
        if len(phs) != len(inputs):
            raise RuleError(f"sub-graph takes {len(phs)} inputs, the op passes {len(inputs)}")
        outputs = []
        for node in graph.nodes:
            if node.op == "placeholder":
                self.env[node] = inputs[phs.index(node)]
                src = outer[phs.index(node)] if outer else None
                if isinstance(src, torch.fx.Node):
                    self.outer[node] = src
                    if (v := values_of(self, src)) is not None:
                        self.values[node] = v
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                outputs = [self.env.get(o) if isinstance(o, torch.fx.Node) else None for o in outs]
            else:
                self.env[node] = None
        return outputs

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


def _check_output(store, out, val) -> None:
    """A rule's result must have one layout per dim of the op's output, each of that dim's size."""
    if isinstance(val, torch.Tensor):
        if not isinstance(out, tuple) or len(out) != val.dim():
            raise RuleError(f"rule gave {len(out) if isinstance(out, tuple) else type(out).__name__} layouts "
                            f"for a {val.dim()}-d output")
        for lay, n in zip(out, val.shape):
            n = _safe_size(n)
            size = 1 if lay is None else store.expand(lay).size
            if n is not None and size != n and not (lay is None and n <= 1):
                raise RuleError(f"rule gave a layout of size {size} for an output dim of size {n}")
    elif isinstance(val, (list, tuple)) and isinstance(out, list):
        if len(out) != len(val):
            raise RuleError(f"rule gave {len(out)} outputs for {len(val)}")
        for o, v in zip(out, val):
            if isinstance(v, torch.Tensor) or o is not None:
                _check_output(store, o, v)


def _fresh_like(ctx: Ctx, val, why):
    if isinstance(val, torch.Tensor):
        return tuple(ctx.store.new(n, ctx.reason("created", "origin"), blocked=ctx.reason(why)) if n is not None else None
                     for n in (_safe_size(s) for s in val.shape))
    if isinstance(val, (list, tuple)):
        return [_fresh_like(ctx, v, why) for v in val]
    return None


def propagate(cap: Capture, strict: bool = False) -> DimFlow:
    """Run every op rule over the captured graph."""
    return _Runner(cap, strict).run()
