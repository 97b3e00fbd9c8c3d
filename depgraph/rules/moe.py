"""Routed experts (mixture of experts): top-k routing and the ops that read the expert indices it makes.

A *routing site* is ``topk(z, k, dim=E)`` over router logits ``z = linear(x, W_r[, b_r])`` reached through
ops that keep a logit of ``-inf`` meaning "this expert takes no part" (casts, views, softmax or sigmoid over
E, adding finite tensors, scaling by a positive constant). The expert dim E is then blocked with the site's
reason; only an ``experts`` group (depgraph.graph) lifts it, and only as whole experts.

The top-k's indices (of any top-k; only a routing site's can make an experts group) are *expert values*: integer tensors whose values index E (:class:`ExpertValues`,
kept in ``flow.values``). The ops that read them couple E with the dims they select:

- ``index``/``index_select`` of a tensor by expert indices: that tensor's dim is E (a 3-D expert weight
  ``[E, out, in]`` gathered per token, a per-expert bias);
- ``histc(ids, bins=|E|, min=0, max=|E|-1)``: per-expert counts along E; ``cumsum`` of them: offsets;
- ``grouped_mm(x, W, offs)`` with such offsets: W's dim 0 is E, x's last dim is W's dim 1;
- views, casts, clones and ``sort`` keep the values expert indices (renumbering the experts that stay
  keeps their order, so sorted order and groups are unchanged), and so does ``cat`` of expert indices;
- ``scatter(canvas, E, ids, src or value)``: the canvas's dim is E (a removed expert is never chosen, so its
  column is the canvas's own).

A ``max`` over router logits whose indices are used is a top-1 routing site; a top-k or max over logits in
which earlier choices were scattered to ``-inf`` chooses among the others (its site counts them in top_k). A
``sum`` over E is exact when a removed expert's slice of the summand is zero (every expert run on every
token, its output a product with its zeroed weights); a grouped matmul whose groups are not routed experts
keeps its in/out channels and blocks only its group dim.

Any other op reading expert indices blocks E with its name and module path: the proof covers only what
these rules understand. Removal equals masking for whole experts when masking an expert means: zero its
parameters *and* make its router logit ``-inf`` (see depgraph.routing).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from . import RuleError, op_name, rule


@dataclass(frozen=True)
class ExpertValues:
    """A tensor whose values are expert indices (``index``), per-expert counts along its dim 0 (``count``)
    or cumulative counts (``offsets``), over the expert space ``experts`` (a layout)."""

    kind: str
    experts: object
    k: int = 0  # indices of routing sites: how many distinct experts each token's indices name (0: unknown)


@dataclass
class RoutingSite:
    """One top-k over router logits: the expert dim's layout, how many experts each token reads, the
    router's linear (module path, parameter names) and the ops between it and the top-k."""

    experts: object  # layout of the logits' expert dim
    top_k: int
    module: str  # where the top-k happens
    router_module: str  # where the router's linear is called
    router: tuple  # parameter names of that linear (weight, bias)
    reason: str  # the block reason the expert dim carries until an experts group claims it
    chain: tuple  # (op, module path) of every op from the router's linear to the top-k
    correction: tuple = ()  # tensors added to the router probabilities to choose (set to -inf to mask an expert)
    exact_over: tuple = ()  # (op, module path) of softmaxes over E of the -inf-masked logits after the router


GROUPED_MM_ALIGN = 8  # grouped_mm kernels need 16-byte strides: 8 elements in bf16/fp16


class Unrouted(Exception):
    """Internal: an op reads expert indices in a way the rules below do not prove."""


ROUTED: dict = {}


def routed_rule(*names: str):
    """Register ``fn(ctx, infos, fallback)`` for ops that read expert values (``infos``: input -> ExpertValues)."""
    def register(fn):
        for n in names:
            ROUTED[n] = fn
        return fn
    return register


def values_of(flow, node):
    if not isinstance(node, torch.fx.Node):
        return None
    if node.target is operator.getitem:
        return flow.values.get((node.args[0], node.args[1]))
    return flow.values.get(node)


def routed(ctx, fallback):
    """Run the op's rule; an op that reads expert values goes through ``ROUTED`` (or blocks E, then ``fallback``)."""
    infos = {a: v for a in ctx.node.all_input_nodes if (v := values_of(ctx.flow, a)) is not None}
    if not infos:
        return fallback(ctx)
    ctx.flow.moe_modules.add(ctx.where)
    fn = ROUTED.get(ctx.op)
    why = f"expert indices read by aten.{ctx.op}, which has no expert rule"
    if fn is not None:
        try:
            return fn(ctx, infos, fallback)
        except Unrouted as e:
            why = str(e)
    for v in infos.values():
        ctx.block(v.experts, why)
    return fallback(ctx)


# -- the top-k: routing sites --------------------------------------------------------------------
_KEEP_MINUS_INF = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as", "view", "reshape",
                   "_unsafe_view", "lift_fresh_copy", "squeeze", "unsqueeze", "flatten"}
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax")


def _same_space(store, a, b) -> bool:
    return a is not None and b is not None and set(store.leaves(a)) == set(store.leaves(b))


def _noop_cast(node) -> bool:
    """A cast/alias of a tensor that returns the tensor itself (same dtype and device): ``F.linear`` sees the
    parameter, so routing masks keyed by the parameter still apply (depgraph.routing)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and op_name(node.target) in ("to", "type_as") and not node.kwargs.get("copy")):
        return False
    src = node.args[0]
    a, b = node.meta.get("val"), getattr(src, "meta", {}).get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
        a.device == b.device


def _uncast(node):
    while _noop_cast(node):
        node = node.args[0]
    return node


def _router_chain(ctx, x, experts):
    """Walk back from the top-k input to the router's ``linear``; ``(linear node, chain)`` or ``(None, why)``.

    Then check, from the linear forward, that a masked expert stays "not routed": while the values are
    logits its entry is ``-inf`` (casts, views, adding a finite tensor, scaling by a positive constant,
    log-softmax keep it; a parameter or persistent buffer added to logits is sliced with the experts when it
    spans E); softmax or sigmoid over E turn it into ``0`` with the others positive and
    renormalised as if it were absent; after that only casts, views and positive scaling are allowed. A
    parameter or buffer added to the probabilities (DeepSeek-V3's score correction bias; shape [E] or [1, E])
    would make a masked expert selectable again, unless masking also sets its entry to ``-inf``: such a
    tensor is returned as the
    site's ``correction`` (masked with ``-inf``, sliced like the router rows), after which the values are
    "choice" scores where a masked expert is ``-inf`` again, kept by casts, views, positive scaling and
    ``masked_fill(..., -inf)`` (group-limited routing's mask). Logits with an earlier routing's choices
    scattered to ``-inf`` keep a masked expert ``-inf``; those choices are counted (``taken``): this top-k
    needs that many more experts left. Returns ``(linear, chain, correction, taken)``."""
    from ..dimflow import module_path

    nodes, node = [], x
    while len(nodes) < 32:
        node = _outer(ctx, node)
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return None, "top-k input does not come from a linear layer", (), 0
        nodes.append(node)
        if op_name(node.target) == "linear":
            break
        node = node.args[0]
    else:
        return None, "too many ops between the router and the top-k", (), 0
    linear = nodes[-1]
    w = linear.args[1]
    w = _uncast(w)  # ``self.weight.type(torch.float32)`` on an fp32 weight: the parameter itself at run time
    if not ctx.is_parameter(w):
        return None, "the router's weight is not a parameter", (), 0
    if not _same_space(ctx.store, ctx.lay(linear)[-1], experts):
        return None, "top-k dim is not the router's output dim", (), 0
    state, correction, taken = "logits", (), 0
    for node in reversed(nodes[:-1]):
        op = op_name(node.target)
        tensors = [a for a in node.args if ctx.is_tensor(a)]
        others = [a for a in tensors if a is not node.args[0]]
        if op in _KEEP_MINUS_INF:
            continue
        if op in ("mul", "div") and not others and isinstance(node.args[1], (int, float)) and node.args[1] > 0:
            continue
        if state == "logits" and op in ("add", "sub") and len(tensors) >= 1 and tensors[0] is node.args[0] \
                and all(_stored(ctx, a) for a in others):
            continue  # -inf plus a finite stored tensor: still -inf (one over E is sliced with the experts)
        if state == "logits" and op in _SOFTMAX + ("sigmoid",):
            if op != "sigmoid":
                src = node.args[0]
                if not _same_space(ctx.store, ctx.lay(src)[node.args[1] % len(ctx.lay(src))], experts):
                    return None, f"aten.{op} over another dim between the router and the top-k", (), 0
            state = "logits" if op in ("log_softmax", "_log_softmax") else "probabilities"
            continue
        if state == "probabilities" and op == "add" and tensors and tensors[0] is node.args[0] and others:
            names = [_stored_tensor(ctx, a, experts) for a in others]
            if all(names):
                correction += tuple(names)
                state = "choice"
                continue
        if state == "choice" and op == "masked_fill" and _minus_inf(ctx, node):
            continue
        if state == "logits" and op == "scatter" and _minus_inf(ctx, node) and \
                (info := values_of(ctx.flow, _outer(ctx, node.args[2]))) is not None and info.kind == "index" \
                and info.k and _same_space(ctx.store, ctx.lay(node)[node.args[1] % len(ctx.lay(node))], experts):
            taken += info.k  # the experts an earlier top-k chose, taken out: this one chooses among the others
            continue
        return None, f"aten.{op} on router {state} before the top-k", (), 0
    return linear, tuple((op_name(n.target), module_path(n)) for n in reversed(nodes)), correction, taken


def _outer(ctx, node):
    """A higher-order op's body placeholder stands for the op's argument (rules.control)."""
    while isinstance(node, torch.fx.Node) and node.op == "placeholder" and node in ctx.flow.outer:
        node = ctx.flow.outer[node]
    return node


_STORED_VIEWS = ("unsqueeze", "squeeze", "view", "reshape", "_unsafe_view", "to", "type_as", "expand")


def _stored(ctx, node):
    """The placeholder of the parameter or persistent buffer behind ``node`` (through views and casts of
    it), else None: model state, sliced by shrink where it spans a pruned dim."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and op_name(node.target) in _STORED_VIEWS:
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.op == "placeholder"):
        return None
    if ctx.is_parameter(node) or ctx.flow.cap.buffers.get(node.name) in ctx.flow.cap.persistent_buffers:
        return node
    return None


def _stored_tensor(ctx, node, experts):
    """The parameter/buffer name behind ``node`` (through views and no-op casts) when it holds one value per
    expert (one dim over the expert dim, every other dim of size 1), else None."""
    node = _stored(ctx, node)
    if node is None:
        return None
    name = ctx.parameter_name(node) or ctx.flow.cap.buffers.get(node.name)
    lay = ctx.flow.env.get(node) or ()
    over = [lo for lo in lay if lo is not None]
    if len(over) != 1 or ctx.shape(node).count(1) != len(lay) - 1 or not _same_space(ctx.store, over[0], experts):
        return None
    return name


def _minus_inf(ctx, node) -> bool:
    """Whether a ``masked_fill`` / ``scatter`` node writes the scalar ``-inf`` (a masked expert stays ``-inf``)."""
    at = 3 if op_name(node.target) == "scatter" else 2
    value = node.args[at] if len(node.args) > at else node.kwargs.get("value")
    return isinstance(value, float) and value == float("-inf")


def _site(ctx, x, experts, k, largest, what):
    """Make the top-k (or top-1) over ``x``'s expert dim a routing site when ``x`` is router logits, else block
    the dim; either way its indices are expert values (set by the caller). Returns the site or None."""
    from ..dimflow import module_path

    linear, chain, correction, taken = _router_chain(ctx, x, experts) if largest else (None, "smallest-k", (), 0)
    ctx.flow.moe_modules.update((ctx.where, ctx.where.rpartition(".")[0]))  # the router and the block calling it
    if linear is None:
        ctx.block(experts, f"data moved along the dim by aten.{ctx.op} ({chain})")
        return None
    reason = ctx.reason(f"routed by {what}: prunable only as whole experts")
    ctx.store.block(experts, reason)
    names = tuple(ctx.parameter_name(a) for a in map(_uncast, linear.args[1:3]) if ctx.is_parameter(a))
    site = RoutingSite(experts, k + taken, ctx.where, module_path(linear), names, reason, chain, correction,
                       _softmaxes_after(linear))
    ctx.flow.routing.append(site)
    return site


def _softmaxes_after(linear) -> tuple:
    """(op, module path) of every softmax over the last dim reached from the router's logits through ops that keep
    a masked expert's ``-inf`` (casts, views, ``masked_fill``/``scatter`` of ``-inf`` into them): its masked entry
    is 0 and the others are renormalised as if it were absent, so it is exact over the experts."""
    from ..dimflow import module_path

    out, todo, seen = [], [linear], set()
    while todo:
        node = todo.pop()
        for u in node.users:
            if u in seen or u.op != "call_function" or not u.args or u.args[0] is not node:
                continue
            seen.add(u)
            op = op_name(u.target)
            if op in _SOFTMAX and len(u.args) > 1 and isinstance(u.args[1], int) and \
                    u.args[1] % node.meta["val"].dim() == node.meta["val"].dim() - 1:
                out.append((op, module_path(u)))
            elif (op in ("masked_fill", "scatter") and _minus_inf(None, u)) or \
                    (op in _KEEP_MINUS_INF and op not in ("view", "reshape", "_unsafe_view", "flatten", "squeeze",
                                                          "unsqueeze")):
                todo.append(u)
    return tuple(out)


@rule("topk")
def topk(ctx):
    """values, indices = topk(x, k, dim=-1, largest=True): the dim becomes k slots. Over router logits it is
    a routing site and the indices are expert values; otherwise the dim is blocked (data moved along it)."""
    x, k = ctx.arg(0, "self"), ctx.arg(1, "k")
    dim, largest = ctx.arg(2, "dim", -1), ctx.arg(3, "largest", True)
    lay = list(ctx.lay(x))
    if not isinstance(dim, int) or not isinstance(k, int) or not lay:
        for lo in lay:
            ctx.block(lo, "aten.topk with a symbolic k or dim")
        return [ctx.fresh(tuple(int(s) for s in v.shape), "aten.topk output") for v in ctx.out_val]
    dim %= len(lay)
    experts = lay[dim]
    out = lay[:dim] + [ctx.fresh((k,), "top-k slots")[0]] + lay[dim + 1:]
    if experts is None:
        return [tuple(out), tuple(out)]
    site = _site(ctx, x, experts, k, largest, "top-k")
    ctx.flow.values[(ctx.node, 1)] = ExpertValues("index", experts, k if site else 0)
    return [tuple(out), tuple(out)]


@rule("max")
def max_(ctx):
    """values, indices = max(x, dim, keepdim): over router logits, with its indices used, a top-1 routing site
    (its values are the largest logit: a masked expert's -inf never is); any other max is a reduction."""
    from .norm import reduce

    used = any(u.target is operator.getitem and u.args[1] == 1 for u in ctx.node.users)
    if not (ctx.has_arg("dim") and ctx.has_arg("keepdim") and isinstance(ctx.arg(1, "dim"), int) and used):
        return reduce(ctx)
    x, keep = ctx.arg(0, "self"), ctx.arg(2, "keepdim")
    lay = list(ctx.lay(x))
    dim = ctx.arg(1, "dim") % len(lay)
    experts = lay[dim]
    if experts is None or _router_chain(ctx, x, experts)[0] is None:
        return reduce(ctx)
    site = _site(ctx, x, experts, 1, True, "max")
    ctx.flow.values[(ctx.node, 1)] = ExpertValues("index", experts, 1 if site else 0)
    out = lay[:dim] + ([None] if keep else []) + lay[dim + 1:]
    return [tuple(out), tuple(out)]


# -- sums over the experts ---------------------------------------------------------------------------
_ZERO_VIEWS = ("view", "reshape", "_unsafe_view", "flatten", "clone", "contiguous", "alias", "detach", "to",
               "_to_copy", "type_as", "transpose", "permute", "t", "squeeze", "unsqueeze", "expand", "chunk",
               "split", "split_with_sizes", "unbind")
_ZERO_AT_ZERO = ("silu", "gelu", "relu", "relu6", "tanh", "neg", "leaky_relu", "hardtanh")  # f(0) == 0
_PRODUCTS = ("mul", "bmm", "matmul", "mm")


def _over(store, lay, leaves) -> bool:
    return any(set(store.leaves(lo)) & leaves for lo in (lay or ()) if lo is not None)


def _zero_at_removed(flow, node, leaves, depth=0) -> bool:
    """Is ``node``'s slice at a removed expert (a unit of the expert dim ``leaves``) zero once the experts are
    masked? True for a parameter over that dim (masking zeroes it), a product with such a factor along the
    dim (``bmm`` by the experts' zeroed down projection), views of it, f(0) = 0 activations and sums of them."""
    node = flow.outer.get(node, node)
    if not isinstance(node, torch.fx.Node) or depth > 64:
        return False
    lay = flow.env.get(node)
    lays = [lay] if isinstance(lay, tuple) else [t for t in lay or () if isinstance(t, tuple)]
    if not any(_over(flow.store, t, leaves) for t in lays):  # a slice along the dim: the tensor has the dim
        return False
    if node.op == "placeholder":
        return node.name in flow.cap.params
    if node.op != "call_function":
        return False
    op = op_name(node.target)
    if node.target is operator.getitem or op in _ZERO_VIEWS + _ZERO_AT_ZERO:
        return _zero_at_removed(flow, node.args[0], leaves, depth + 1)
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if op in _PRODUCTS:  # one zero factor over the dim
        return any(_zero_at_removed(flow, a, leaves, depth + 1) for a in tensors)
    if op in ("add", "sub"):
        return bool(tensors) and all(_zero_at_removed(flow, a, leaves, depth + 1) for a in tensors)
    return False


@rule("sum")
def sum_(ctx):
    """A sum: a reduction (rules.norm), exact over a routed expert dim when the summed tensor's slice at a removed
    expert is zero (every expert run on every token, the outputs added up: removing one adds nothing)."""
    from .norm import reduce

    src = ctx.arg(0, "self")
    lay = ctx.lay(src)
    dims = ctx.arg(1, "dim") if ctx.has_arg("dim") else None
    dims = range(len(lay)) if dims in (None, []) else [dims] if isinstance(dims, int) else dims
    routed = {c for site in ctx.flow.routing for c in ctx.store.leaves(site.experts)}
    reason = ctx.reason(f"reduced over by aten.{ctx.op}")
    exact = [c for d in dims for c in ctx.store.leaves(lay[d % len(lay)]) if c in routed and reason not in c.inexact]
    out = reduce(ctx)
    if exact and _zero_at_removed(ctx.flow, src, set(exact)):
        for c in exact:
            c.inexact.remove(reason)
    return out


# -- ops that read expert values -------------------------------------------------------------------
_VALUE_VIEWS = ("view", "reshape", "_unsafe_view", "flatten", "clone", "contiguous", "alias", "detach", "to",
                "_to_copy", "lift_fresh_copy", "squeeze", "unsqueeze", "expand")


@routed_rule(*_VALUE_VIEWS)
def value_view(ctx, infos, fallback):
    """Same values, other shape or dtype: still expert indices."""
    (info,) = infos.values()
    if info.kind != "index":
        raise Unrouted(f"expert {info.kind} reshaped by aten.{ctx.op}")
    out = fallback(ctx)
    ctx.flow.values[ctx.node] = info
    return out


@routed_rule("_assert_tensor_metadata")
def value_check(ctx, infos, fallback):
    return fallback(ctx)


@routed_rule("sort")
def value_sort(ctx, infos, fallback):
    """Sorted expert indices are expert indices (output 0); the permutation (output 1) is positions."""
    (info,) = infos.values()
    if info.kind != "index":
        raise Unrouted("expert counts sorted by aten.sort")
    out = fallback(ctx)
    ctx.flow.values[(ctx.node, 0)] = info
    return out


@routed_rule("histc")
def value_histc(ctx, infos, fallback):
    """histc(ids, bins=|E|, min=0, max=|E|-1): one bin per expert, so the output's dim is E."""
    (info,) = infos.values()
    n = info.experts.size if info.experts is not None else 1
    bins, lo, hi = ctx.arg(1, "bins", 100), ctx.arg(2, "min", 0), ctx.arg(3, "max", 0)
    if info.kind != "index" or (bins, lo, hi) != (n, 0, n - 1):
        raise Unrouted(f"aten.histc of expert indices with bins={bins}, range [{lo}, {hi}] (not one bin per "
                       f"expert of {n})")
    ctx.flow.values[ctx.node] = ExpertValues("count", info.experts)
    return (info.experts,)


@routed_rule("cumsum")
def value_cumsum(ctx, infos, fallback):
    """Offsets from per-expert counts: an expert that is never routed adds a zero count, so deleting it
    deletes a repeated offset and leaves every other group of rows unchanged."""
    (info,) = infos.values()
    src = ctx.arg(0, "self")
    if info.kind != "count" or len(ctx.shape(src)) != 1 or ctx.arg(1, "dim") not in (0, -1):
        raise Unrouted("aten.cumsum of expert values other than per-expert counts")
    ctx.flow.values[ctx.node] = ExpertValues("offsets", info.experts)
    return tuple(ctx.lay(src))


_GROUPED_MM = ("grouped_mm_fallback", "_grouped_mm", "grouped_mm")


def _grouped_mm_args(ctx):
    """(x, W, offs, bias) of a grouped matmul by its schema: transformers' fallback takes (input, weight, offs)."""
    if ctx.op == "grouped_mm_fallback":
        return ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "offs"), None
    return ctx.arg(0, "self"), ctx.arg(1, "mat2"), ctx.arg(2, "offs"), ctx.arg(3, "bias")


def _grouped_mm_channels(ctx, x, w, bias):
    """x [S, in] @ W[g] [in, out] for row s in group g: W's dim 1 is x's last dim, the output is [S, out]."""
    if len(ctx.shape(x)) != 2 or len(ctx.shape(w)) != 3:
        raise Unrouted(f"aten.{ctx.op} on other than 2-D rows and 3-D weights")
    xl, wl = ctx.lay(x), ctx.lay(w)
    ctx.flow.aligned.extend(lo for lo in wl[1:] if lo is not None)
    ctx.unify(xl[-1], wl[1])
    if ctx.is_tensor(bias):
        bl = ctx.lay(bias)
        ctx.unify(bl[0], wl[0])
        ctx.unify(bl[-1], wl[2])
    return (xl[0], wl[2])


@rule(*_GROUPED_MM)
def grouped_mm_any_groups(ctx):
    """A grouped matmul whose groups are not proved to be routed experts (hash routing by token id, offsets
    of any other origin): its in/out channels are still channels of every group's weight, but its group dim
    (W's dim 0, and the offsets' dim) is blocked."""
    x, w, offs, bias = _grouped_mm_args(ctx)
    if len(ctx.shape(x)) != 2 or len(ctx.shape(w)) != 3:
        raise RuleError(f"aten.{ctx.op} on other than 2-D rows and 3-D weights")
    why = f"groups of aten.{ctx.op} are not offsets of a routed top-k"
    ctx.block(ctx.lay(w)[0], why)
    for lo in ctx.lay(offs) if ctx.is_tensor(offs) else ():
        ctx.block(lo, why)
    return _grouped_mm_channels(ctx, x, w, bias)


@routed_rule(*_GROUPED_MM)
def grouped_mm(ctx, infos, fallback):
    """out[s] = x[s] @ W[e(s)] for the rows s in expert e's offsets range: W [E, in, out], x [S, in]."""
    x, w, offs, bias = _grouped_mm_args(ctx)
    info = infos.get(offs)
    if info is None or info.kind != "offsets" or len(infos) != 1:
        raise Unrouted(f"aten.{ctx.op} whose groups are not offsets of routed experts")
    out = _grouped_mm_channels(ctx, x, w, bias)
    ctx.unify(ctx.lay(w)[0], info.experts)
    return out


def _gather(ctx, src, d, ids_node, info):
    """src indexed along dim ``d`` by expert indices: that dim is E; the index's dims replace it."""
    if info.kind != "index":
        raise Unrouted(f"expert {info.kind} used as an index by aten.{ctx.op}")
    lay = ctx.lay(src)
    ctx.unify(lay[d], info.experts)
    rows = ctx.fresh(ctx.shape(ids_node), "rows gathered by expert index")
    return tuple(lay[:d]) + tuple(rows) + tuple(lay[d + 1:])


@routed_rule("index")
def value_index(ctx, infos, fallback):
    """W[ids]: a per-expert tensor read at the routed experts; ids[positions]: still expert indices."""
    src, indices = ctx.arg(0, "self"), list(ctx.arg(1, "indices"))
    if src in infos:
        if len(infos) != 1:
            raise Unrouted("expert indices indexed by expert indices")
        out = fallback(ctx)
        ctx.flow.values[ctx.node] = infos[src]
        return out
    tensor_at = [d for d, ix in enumerate(indices) if ix is not None]
    if len(tensor_at) != 1 or indices[tensor_at[0]] not in infos:
        raise Unrouted("aten.index mixing expert indices with other indices")
    d = tensor_at[0]
    return _gather(ctx, src, d, indices[d], infos[indices[d]])


@routed_rule("index_select")
def value_index_select(ctx, infos, fallback):
    src, dim, ids = ctx.arg(0, "self"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    if src in infos or ids not in infos:
        raise Unrouted("aten.index_select of expert indices")
    return _gather(ctx, src, dim % len(ctx.shape(src)), ids, infos[ids])



@routed_rule("scatter", "scatter_")
def value_scatter(ctx, infos, fallback):
    """out = canvas.scatter(dim, ids, src or value), ids expert indices along the canvas's dim ``dim`` (dense
    routing weights: the top-k scores written into ``full_like(logits, -inf)``; a chosen expert set to -inf
    before choosing the next): that dim is E, the other dims are the canvas's. A removed expert is never
    chosen, so its column is the canvas's own column, as through an elementwise op."""
    canvas, dim, ids = ctx.arg(0, "self"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    if canvas in infos or ids not in infos or infos[ids].kind != "index" or len(infos) != 1:
        raise Unrouted(f"aten.{ctx.op} of expert indices other than into a tensor over the experts")
    lay, shp = ctx.lay(canvas), ctx.shape(canvas)
    dim %= len(shp)
    ctx.unify(lay[dim], infos[ids].experts)
    for a in (ids, ctx.arg(3, "src") if ctx.has_arg("src") else None):
        if not ctx.is_tensor(a):
            continue
        al, ash = ctx.lay(a), ctx.shape(a)
        if len(ash) != len(shp) or any(ash[d] != shp[d] for d in range(len(shp)) if d != dim):
            raise Unrouted(f"aten.{ctx.op} writing part of the canvas's other dims")
        for d in range(len(shp)):
            if d != dim:
                ctx.unify(al[d], lay[d])
    return tuple(lay)


@routed_rule("cat", "concat", "concatenate")
def value_cat(ctx, infos, fallback):
    """Expert indices side by side (a first and a second choice): still indices of the same experts, naming
    as many experts per token as the parts together."""
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    parts = [infos.get(t) for t in tensors]
    if any(p is None or p.kind != "index" for p in parts) or \
            any(not _same_space(ctx.store, p.experts, parts[0].experts) for p in parts):
        raise Unrouted(f"aten.{ctx.op} of expert indices with other tensors")
    out = fallback(ctx)
    k = sum(p.k for p in parts) if all(p.k for p in parts) else 0
    ctx.flow.values[ctx.node] = ExpertValues("index", parts[0].experts, k)
    return out


@routed_rule("gather")
def value_gather(ctx, infos, fallback):
    """out = src.gather(dim, ids), ids expert indices along src's dim ``dim`` (``scores.gather(1, topk_idx)``):
    that dim is E; out has the index's slots there and src's dims elsewhere (where the sizes agree)."""
    src, dim, ids = ctx.arg(0, "self"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    if src in infos or ids not in infos or infos[ids].kind != "index":
        raise Unrouted("aten.gather of expert indices")
    lay, ilay = ctx.lay(src), ctx.lay(ids)
    sshape, ishape = ctx.shape(src), ctx.shape(ids)
    if len(lay) != len(ilay):
        raise Unrouted("aten.gather with an index of another rank")
    dim %= len(lay)
    ctx.unify(lay[dim], infos[ids].experts)
    out = []
    for d in range(len(lay)):
        if d == dim:
            out.append(ilay[d])
        elif sshape[d] == ishape[d]:
            ctx.unify(lay[d], ilay[d])
            out.append(lay[d])
        else:
            ctx.block(lay[d], "dim cut by aten.gather's smaller index")
            out.append(ilay[d])
    return tuple(out)
