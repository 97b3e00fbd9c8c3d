"""Residual blocks found in the traced graph: the ``block`` group kind (depth pruning).

A *residual branch* is an ``add(x, y)`` on the residual stream (the hidden space the token embedding writes)
where ``y = f(x)`` reads the stream: the branch is every node that serves ``y`` alone (exclusive ancestors of
``y`` computed after ``x``, with the parameters only they use). Each branch is one ``block`` group (an attention or
MLP sub-block); the consecutive branches whose adds run in one entry of a ``ModuleList`` (a decoder layer) and
account for every node of it form a *layer* block as well.

*Masking* a block zeroes its *write* parameters (what it adds to the residual: the output projection's weight and
bias), found by a proof on the graph (:data:`ZERO_RULES`, one small rule per op family): ``y`` is exactly zero
once they are zero, for any input (a product with a zero factor is zero when the other factor stays finite:
``rsqrt(mean(x^2) + eps)`` with ``eps > 0`` is, so a branch ending in an RMSNorm or LayerNorm still masks
exactly). Then ``x + y == x``, which is what removing the branch computes. *Removing* a sub-block replaces the
modules wholly inside the branch by no-ops returning zeros (:mod:`depgraph.depth`); a layer is dropped from its
``ModuleList``. Anything the proof cannot show (an op without a zero rule, a parameter shared with other layers, a
branch output read elsewhere, a module that is only partly inside the branch) refuses the block with the op and
module path in ``graph.blocked_blocks``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .dimflow import module_path
from .groups import Group, Member
from .rules import op_name

# ops that pass a value through unchanged (when dtype and shape stay the same): aliases of the stream
IDENTITY = frozenset(("to", "_to_copy", "alias", "detach", "contiguous", "clone", "lift_fresh_copy", "type_as"))
VALUE_VIEWS = IDENTITY | {"view", "reshape", "_unsafe_view"}  # same values, maybe another shape

ZERO_RULES: dict = {}  # op name -> fn(node) -> alternatives: tuples of arguments that, all zero, make the output zero


def zero_rule(*ops):
    def register(fn):
        for op in ops:
            ZERO_RULES[op] = fn
        return fn
    return register


def arg(node, name: str, i: int | None = None):
    """Argument ``name`` of ``node`` by its op's schema (position, keyword or default)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        if i is not None and len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name)
    for k, a in enumerate(schema.arguments):
        if a.name == name:
            if not a.kwarg_only and len(node.args) > k:
                return node.args[k]
            if name in node.kwargs:
                return node.kwargs[name]
            return a.default_value if a.has_default_value() else None
    raise KeyError(f"{op_name(node.target)} has no argument {name!r}")


def _first(node):
    return node.args[0] if node.args else None


@zero_rule("view", "reshape", "_unsafe_view", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
           "flatten", "unflatten", "slice", "select", "narrow", "index", "index_select", "chunk", "split",
           "split_with_sizes", "unbind", "repeat", "repeat_interleave", "roll", "flip", "neg", "dropout", "silu",
           "gelu", "relu", "tanh", "sum", "mean", "getitem", "_log_softmax_backward_data", *IDENTITY)
def _passes_zero(node):
    """f(0) == 0 elementwise, or a rearrangement/reduction of the input's values."""
    return [(_first(node),)]


@zero_rule("linear")
def _linear(node):
    return [(arg(node, "weight", 1), arg(node, "bias", 2)), (arg(node, "input", 0), arg(node, "bias", 2))]


@zero_rule("addmm")
def _addmm(node):
    return [(arg(node, "self", 0), arg(node, "mat2", 2)), (arg(node, "self", 0), arg(node, "mat1", 1))]


@zero_rule("mm", "bmm", "matmul", "_grouped_mm", "grouped_mm", "grouped_mm_fallback")
def _product(node):
    return [(node.args[1],), (node.args[0],)]


@zero_rule("mul")
def _mul(node):
    a, b = node.args[0], node.args[1]
    return [(b,), (a,)] if _is_placeholder(b) else [(a,), (b,)]


@zero_rule("div")
def _div(node):
    return [(node.args[0],)]


@zero_rule("add", "sub")
def _add(node):
    return [(node.args[0], node.args[1])]


@zero_rule("index_add", "index_add_")
def _index_add(node):
    return [(arg(node, "self", 0), arg(node, "source", 3))]


@zero_rule("scatter_add", "scatter_add_")
def _scatter_add(node):
    return [(arg(node, "self", 0), arg(node, "src", 3))]


@zero_rule("index_put", "index_put_")
def _index_put(node):
    return [(arg(node, "self", 0), arg(node, "values", 2))]


@zero_rule("zeros", "zeros_like", "new_zeros")
def _zeros(node):
    return [()]


@zero_rule("full", "full_like", "new_full")
def _full(node):
    return [()] if arg(node, "fill_value") == 0 else []


@zero_rule("cat", "stack")
def _cat(node):
    return [tuple(node.args[0])]


@zero_rule("where")
def _where(node):
    return [(node.args[1], node.args[2])]


@zero_rule("layer_norm")
def _layer_norm(node):
    """(x - mean) / sqrt(var + eps) * w + b: zero when w and b are, or when x is (the normalised zero is zero)."""
    w, b = arg(node, "weight", 2), arg(node, "bias", 3)
    return ([(w, b)] if w is not None else []) + [(arg(node, "input", 0), b)]


@zero_rule("rms_norm")
def _rms_norm(node):
    w = arg(node, "weight", 2)
    return ([(w,)] if w is not None else []) + [(arg(node, "input", 0),)]


@zero_rule("scaled_dot_product_attention")
def _sdpa(node):
    return [(arg(node, "value", 2),)]


def _is_placeholder(a) -> bool:
    return isinstance(a, torch.fx.Node) and a.op == "placeholder"


# ops whose output can be infinite when an input becomes zero (1/0, log 0)
_SINGULAR = frozenset(("rsqrt", "reciprocal", "log", "log2", "log10", "div", "pow"))


@dataclass
class Branch:
    """One residual branch: ``add = stream + out`` with ``nodes`` the exclusive ancestors of ``out``."""

    add: torch.fx.Node
    stream: torch.fx.Node
    out: torch.fx.Node
    nodes: set
    params: list = field(default_factory=list)  # canonical names of the parameters only this branch uses
    writes: list = field(default_factory=list)  # parameters whose zeroing makes ``out`` zero
    modules: list = field(default_factory=list)  # modules wholly inside the branch (replaced by no-ops)
    reader: str = ""  # the replaced module that reads the stream
    writers: list = field(default_factory=list)  # replaced modules whose outputs form ``out``
    part: str = "mlp"
    layer_module: str = ""
    reasons: list = field(default_factory=list)


_DIGITS = re.compile(r"^\d+$")


class BlockFinder:
    """Finds the residual branches of a captured graph (``cap``, ``flow`` from dimflow) and proves them."""

    def __init__(self, cap, flow):
        self.cap, self.flow = cap, flow
        self.nodes = list(cap.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.params = dict(cap.params)  # placeholder name -> canonical parameter
        self.buffers = dict(cap.buffers)
        self.paths = {n: module_path(n) for n in self.nodes if n.op == "call_function"}
        self.attention_modules = {s.module for s in flow.attention}
        self.hidden = self._hidden_leaves()
        self.placeholders: dict = {}  # canonical parameter -> its placeholders (a tied weight may have several)
        for n in self.nodes:
            if n.op == "placeholder" and n.name in self.params:
                self.placeholders.setdefault(self.params[n.name], []).append(n)
        self.aliases = dict(cap.aliases)

    # -- the residual stream ---------------------------------------------------------------
    def _hidden_leaves(self):
        store = self.flow.store
        for n in self.nodes:
            if n.op == "call_function" and op_name(n.target) == "embedding":
                lays = self.flow.env.get(n)
                if lays and lays[-1] is not None:
                    return tuple(store.leaves(lays[-1]))
        return None

    def _on_stream(self, n) -> bool:
        lays = self.flow.env.get(n)
        if not isinstance(lays, tuple) or not lays or lays[-1] is None or self.hidden is None:
            return False
        return tuple(self.flow.store.leaves(lays[-1])) == self.hidden

    def root(self, n):
        """``n`` with value-preserving ops (same-dtype casts, aliases, views) stripped."""
        while _is_view_of(n):
            n = n.args[0]
        return n

    def residual_adds(self) -> list:
        out = []
        for n in self.nodes:
            if n.op != "call_function" or op_name(n.target) != "add" or len(n.args) < 2:
                continue
            a, b = n.args[0], n.args[1]
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or n.kwargs.get("alpha", 1) != 1:
                continue
            if not (_same_value(n, a) and _same_value(n, b) and self._on_stream(n)):
                continue
            x, y = (a, b) if self.order[a] < self.order[b] else (b, a)
            out.append((n, x, y))
        return out

    # -- one branch ------------------------------------------------------------------------
    def branch(self, add, x, y) -> Branch | None:
        """The exclusive ancestors of ``y`` after ``x``; None when ``y`` does not read the stream."""
        nodes = {y}
        lo = self.order[x]
        for n in reversed(self.nodes[lo + 1:self.order[y]]):
            users = [u for u in n.users if _has_users(u)]
            if users and all(u in nodes for u in users):
                nodes.add(n)
        stream = {x} | self._aliases_up(x)
        if not any(a in stream for n in nodes for a in n.all_input_nodes):
            return None
        for n in list(nodes):
            for a in n.all_input_nodes:
                same = self.placeholders.get(self.params.get(a.name), [a])
                if a.op == "placeholder" and all(u in nodes for ph in same for u in ph.users if _has_users(u)):
                    nodes.add(a)
        br = Branch(add, x, y, nodes, layer_module=self.paths.get(add, ""))
        br.params = sorted({self.params[a.name] for a in nodes if a.op == "placeholder" and a.name in self.params})
        if [u for u in y.users if _has_users(u)] != [add]:
            br.reasons.append(f"the branch output {y.name} ({op_name(y.target)} at {self.paths.get(y) or '<root>'}) "
                              f"is also read outside the residual add")
        return br

    def _aliases_up(self, x) -> set:
        out, n = set(), x
        while _is_view_of(n):
            n = n.args[0]
            out.add(n)
        return out

    def prove(self, br: Branch, is_seed) -> set | None:
        """The seed nodes whose being zero makes ``br.out`` exactly zero, by :data:`ZERO_RULES`; None if none do."""
        memo: dict = {}
        safe_memo: dict = {}

        def safe(other) -> bool:
            """``other`` stays finite whatever zeros flow into it (no 1/0 on a value the masking can zero)."""
            if not isinstance(other, torch.fx.Node) or other not in br.nodes or other.op != "call_function":
                return True
            if other in safe_memo:
                return safe_memo[other]
            safe_memo[other] = True  # cycles cannot happen in a DAG; guards recursion
            op = op_name(other.target)
            if op == "rsqrt" or (op == "reciprocal"):
                ok = _eps_guarded(other.args[0])
            elif op in _SINGULAR:
                ok = False
            else:
                ok = all(safe(a) for a in other.all_input_nodes)
            safe_memo[other] = ok
            return ok

        def walk(n):
            if n in memo:
                return memo[n]
            memo[n] = None
            if is_seed(n):
                memo[n] = {n}
                return memo[n]
            if n.op != "call_function" or n not in br.nodes:
                return None
            rule = ZERO_RULES.get(op_name(n.target))
            if rule is None:
                return None
            try:
                alternatives = rule(n)
            except (KeyError, IndexError, TypeError):
                return None
            for alt in alternatives:
                acc = set()
                for a in alt:
                    if a is None:
                        continue
                    if isinstance(a, (int, float)) and not isinstance(a, bool):
                        if a == 0:
                            continue
                        break
                    if not isinstance(a, torch.fx.Node):
                        break
                    got = walk(a)
                    if got is None:
                        break
                    acc |= got
                else:
                    op = op_name(n.target)
                    if op in ("mul", "div", "mm", "bmm", "matmul") and not all(
                            safe(o) for o in n.args[:2] if isinstance(o, torch.fx.Node) and o not in alt):
                        continue
                    memo[n] = acc
                    return acc
            return None

        return walk(br.out)

    def first_failure(self, br: Branch) -> str:
        """The op nearest the branch output that no zero rule proves (for the refusal message)."""
        n, seen = br.out, set()
        while isinstance(n, torch.fx.Node) and n not in seen and n.op == "call_function":
            seen.add(n)
            op = op_name(n.target)
            if op not in ZERO_RULES:
                return f"{op} at {self.paths.get(n) or '<root>'} has no zero rule"
            ins = [a for a in n.all_input_nodes if a in br.nodes and a.op == "call_function"]
            if not ins:
                break
            n = ins[0]
        return f"no parameter of the branch ending at {op_name(br.out.target)} ({self.paths.get(br.out) or '<root>'}) " \
               f"zeroes its output"

    # -- modules ---------------------------------------------------------------------------
    def module_nodes(self) -> dict:
        """module path -> call nodes run inside it (its sub-modules included)."""
        out: dict = {}
        for n, path in self.paths.items():
            parts = path.split(".") if path else []
            for k in range(1, len(parts) + 1):
                out.setdefault(".".join(parts[:k]), []).append(n)
        return out

    def replaced_modules(self, br: Branch, by_module: dict) -> list:
        """The largest modules under the add's module whose every node lies in the branch."""
        exempt = {br.stream} | self._aliases_up(br.stream)
        inside = {m for m, ns in by_module.items() if m.startswith(br.layer_module + ".") or not br.layer_module}
        full = set()
        for m in inside:
            ns = [n for n in by_module[m] if _has_users(n) and n not in exempt]
            if ns and all(n in br.nodes for n in ns):
                full.add(m)
        return sorted(m for m in full if not any(m.startswith(o + ".") for o in full))


def _has_users(n) -> bool:
    return bool(n.users) or n.op == "output"


def _is_view_of(n) -> bool:
    """``n`` holds exactly the values of its first argument (a same-dtype cast, alias or view)."""
    if n.op != "call_function" or op_name(n.target) not in VALUE_VIEWS or not n.args or \
            not isinstance(n.args[0], torch.fx.Node):
        return False
    va, vb = n.meta.get("val"), n.args[0].meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and \
        va.numel() == vb.numel()


def _same_value(a, b) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and \
        tuple(va.shape) == tuple(vb.shape)


def _eps_guarded(n) -> bool:
    """``n`` is ``t + c`` with a constant ``c > 0`` and ``t >= 0`` (a mean, sum or variance of squares)."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and op_name(n.target) == "add"):
        return False
    t, c = n.args[0], n.args[1]
    if not (isinstance(c, (int, float)) and c > 0 and isinstance(t, torch.fx.Node)):
        return False
    while t.op == "call_function" and op_name(t.target) in IDENTITY | {"view", "reshape", "unsqueeze", "expand"}:
        t = t.args[0]
    op = op_name(t.target) if t.op == "call_function" else ""
    if op in ("var", "var_mean"):
        return True
    if op in ("mean", "sum") and isinstance(t.args[0], torch.fx.Node):
        sq = t.args[0]
        sop = op_name(sq.target) if sq.op == "call_function" else ""
        return (sop == "pow" and sq.args[1] == 2) or (sop == "mul" and sq.args[0] is sq.args[1])
    return False


def find_blocks(cap, flow, shapes: dict) -> tuple[list, list]:
    """(block groups, refusals) of a captured graph; refusals are ``{"block", "module", "reasons"}`` records."""
    if cap.module is None:
        return [], []
    f = BlockFinder(cap, flow)
    by_module = f.module_nodes()
    modules = dict(cap.module.named_modules())
    groups, refused, branches = [], [], []
    for add, x, y in f.residual_adds():
        br = f.branch(add, x, y)
        if br is None:
            continue
        _settle(f, br, by_module, modules)
        where = br.layer_module or "<root>"
        if br.reasons:
            refused.append({"block": f"{br.part} branch ending at {op_name(y.target)} ({f.paths.get(y) or '<root>'})",
                            "module": where, "reasons": br.reasons[:3]})
            branches.append(None)
            continue
        branches.append(br)
    by_layer: dict = {}
    for br in branches:
        if br is not None:
            by_layer.setdefault(br.layer_module, []).append(br)
    layer_of = {}
    for path, brs in by_layer.items():
        parent, _, idx = path.rpartition(".")
        index = int(idx) if _DIGITS.match(idx) and isinstance(modules.get(parent), torch.nn.ModuleList) else None
        layer_of[path] = index
        for k, br in enumerate(brs):
            part = br.part if sum(b.part == br.part for b in brs) == 1 else f"{br.part}{k}"
            groups.append(_group(f"block.{index if index is not None else path}.{part}", index, br, shapes,
                                 {"part": br.part, "list": parent if index is not None else None, "index": index,
                                  "list_size": len(modules[parent]) if index is not None else None, "parts": len(brs),
                                  "modules": [f"{m}" for m in br.modules], "params": br.params,
                                  "writes": br.writes, "reader": br.reader, "writers": br.writers}))
        if index is None:
            continue
        why = _whole_layer(f, path, brs, by_module, modules)
        if why:
            refused.append({"block": f"layer {path}", "module": path, "reasons": [why]})
            continue
        if len(brs) == 1:  # one branch (parallel attention and MLP): the layer block says it all
            groups = [g for g in groups if g.layer != index]
        params = sorted({f.params[ph] for ph in f.params
                         if f.params[ph].startswith(path + ".")} | {p for br in brs for p in br.params})
        writes = [w for br in brs for w in br.writes]
        groups.append(_group(f"block.{index}", index, brs[-1], shapes,
                             {"part": "layer", "list": parent, "index": index, "list_size": len(modules[parent]),
                              "modules": [path], "params": params,
                              "writes": writes, "reader": path, "writers": [path],
                              "children": [g.id for g in groups if g.layer == index]}))
    groups.sort(key=lambda g: (g.layer if g.layer is not None else -1, g.id.count("."), g.id))
    return groups, refused


def _settle(f: BlockFinder, br: Branch, by_module: dict, modules: dict) -> None:
    """Fill the branch's write parameters, replaced modules, reader and writers, or its refusal reasons."""
    exclusive = {n.name for n in br.nodes if n.op == "placeholder" and n.name in f.params}
    seeds = f.prove(br, lambda n: n.op == "placeholder" and n.name in exclusive)
    if seeds is None:
        br.reasons.append(f.first_failure(br))
    else:
        br.writes = sorted({f.params[n.name] for n in seeds})
    br.modules = f.replaced_modules(br, by_module)
    mods = br.modules
    if any(f.paths.get(n, "") in f.attention_modules or any(f.paths.get(n, "").startswith(a + ".")
                                                            for a in f.attention_modules if a)
           for n in br.nodes if n.op == "call_function"):
        br.part = "attention"
    loose = [p for p in br.params if not any(p.startswith(m + ".") for m in mods)]
    if loose:
        br.reasons.append(f"parameter {loose[0]} of the branch is not inside a module it can replace")
    shared = [f.params[a.name] for n in br.nodes for a in n.all_input_nodes
              if a.op == "placeholder" and a.name in f.params and a not in br.nodes
              and any(name.startswith(m + ".") for m in mods for name in f.aliases.get(f.params[a.name], [f.params[a.name]]))]
    if shared:
        br.reasons.append(f"parameter {shared[0]} is shared with code outside the branch")
    owned = set()
    for m in mods:
        owned.update(by_module.get(m, ()))
    readers = [m for m in mods if any(a in ({br.stream} | f._aliases_up(br.stream))
                                      for n in by_module.get(m, ()) for a in n.all_input_nodes)]
    if not mods or not readers:
        br.reasons.append(f"no module of the branch at {br.layer_module or '<root>'} reads the residual stream")
        return
    br.reader = readers[0]
    outputs = {n for n in owned if any(u not in owned and _has_users(u) for u in n.users)}
    seeds = f.prove(br, lambda n: n in outputs)
    if seeds is None:
        br.reasons.append(f"the output of {op_name(br.out.target)} at {f.paths.get(br.out) or '<root>'} is not "
                          f"zero when its modules return zeros")
        return
    br.writers = sorted({m for m in mods for n in seeds if n in by_module.get(m, ())})


def _whole_layer(f: BlockFinder, path: str, brs: list, by_module: dict, modules: dict) -> str:
    """Why the layer at ``path`` is not exactly its chain of branches ('' when it is)."""
    for a, b in zip(brs, brs[1:]):
        if f.root(b.stream) is not a.add:
            return f"the residual branches of {path} do not chain (the stream of {b.add.name} is not {a.add.name})"
    allowed = set().union(*(br.nodes for br in brs)) | {br.add for br in brs}
    for br in brs:
        allowed |= {br.stream} | f._aliases_up(br.stream)
    layer_nodes = set(by_module.get(path, ()))
    tail, frontier = {brs[-1].add}, [brs[-1].add]  # the layer's output: its last add, maybe viewed
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in layer_nodes and _is_view_of(u) and u.args[0] is n:
                tail.add(u)
                frontier.append(u)
    allowed |= tail
    for n in layer_nodes:
        if not _has_users(n):
            continue
        if n not in allowed:
            return f"{op_name(n.target)} at {f.paths.get(n) or path} is outside its residual branches"
        if n not in tail and any(u not in layer_nodes and _has_users(u) for u in n.users):
            return f"{op_name(n.target)} at {f.paths.get(n) or path} is read outside the layer"
    own = {f.params[ph] for ph in f.params if f.params[ph].startswith(path + ".")}
    used = {p for br in brs for p in br.params}
    outside = sorted(own - used)
    for ph, name in f.params.items():
        if name in outside:
            node = next((n for n in f.nodes if n.op == "placeholder" and n.name == ph), None)
            if node is not None and node.users:
                return f"parameter {name} is read outside the layer's residual branches"
    return ""


def _group(gid: str, layer, br: Branch, shapes: dict, block: dict) -> Group:
    numel = int(sum(np.prod(shapes[p]) for p in block["params"] if p in shapes))
    members = [Member(p, 0, np.zeros(shapes[p][0], dtype=np.int64), "unit", "block", int(np.prod(shapes[p])))
               for p in block["writes"] if p in shapes and len(shapes[p])]
    block = dict(block, numel=numel)
    return Group(gid, "block", layer, 1, 1, members, True, [], module=block["modules"][0] if block["modules"] else None,
                 modules=list(block["modules"]), block=block)
