"""Apply a plan: ``mask`` zeroes the planned units, ``shrink`` removes them and updates the modules and
the config (surgery on weights and config together, like nanoGPT's ``crop_block_size``)."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from . import record as records
from .depth import apply_blocks
from .dispatch import materialized
from .errors import PlanError
from .plan import Plan, check_plan
from .routing import mask_experts

# -- module attributes that follow a parameter's shape: one small fixer per layer type -----------
MODULE_FIXERS: list = []


def fixer(predicate):
    def register(fn):
        MODULE_FIXERS.append((predicate, fn))
        return fn
    return register


def _is(*names):
    """Match a module by class name anywhere in its MRO (``Conv1D`` is transformers', ``Conv1d`` torch's)."""
    return lambda m: any(c.__name__ in names for c in type(m).__mro__)


@fixer(_is("Linear"))
def _linear(m):
    return {"in_features": m.weight.shape[1], "out_features": m.weight.shape[0]}


@fixer(_is("Embedding"))
def _embedding(m):
    return {"num_embeddings": m.weight.shape[0], "embedding_dim": m.weight.shape[1]}


@fixer(_is("LayerNorm"))
def _layer_norm(m):
    return {"normalized_shape": (m.weight.shape[0],)} if m.weight is not None else {}


@fixer(_is("Conv1D"))  # transformers' GPT-2 Conv1D: weight (in, out)
def _conv1d_hf(m):
    return {"nx": m.weight.shape[0], "nf": m.weight.shape[1]}


@fixer(_is("Conv1d", "Conv2d", "Conv3d"))
def _conv(m):
    return {"out_channels": m.weight.shape[0], "in_channels": m.weight.shape[1] * m.groups}


@fixer(_is("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))
def _batch_norm(m):
    return {"num_features": m.weight.shape[0]}


# routed-experts modules (router, experts, the block around them): attributes holding the expert count,
# rewritten when they equal the count before pruning
EXPERT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts", "num_routed_experts")

# fused routed experts ([E, ...] weights) and their routers ([E, hidden] weight): attributes holding a width,
# by role; the down projection's name finds the roles, the gate (or fused gate/up) weight tells hidden from inner
FUSED_DOWN = ("down_proj", "w2")
FUSED_GATE = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3")
FUSED_WIDTHS = {
    "hidden": ("hidden_dim", "hidden_size"),
    "inner": ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_hidden_size", "moe_intermediate_size"),
}


def _fused_experts(m) -> bool:
    return any(getattr(m, n, None) is not None and getattr(m, n).dim() == 3 for n in FUSED_DOWN if n in m._parameters)


@fixer(_fused_experts)
def _experts(m):
    """[E, hidden, inner] or [E, inner, hidden] down weight: the hidden dim is the one the gate weight has at the
    other position ([E, 2 inner, hidden] / [E, hidden, 2 inner]); when both dims could be, nothing is claimed."""
    down = next(m._parameters[n] for n in FUSED_DOWN if n in m._parameters)
    gate = next((m._parameters[n] for n in FUSED_GATE if m._parameters.get(n) is not None), None)
    out = {k: down.shape[0] for k in EXPERT_ATTRIBUTES}
    if gate is not None and gate.dim() == 3:
        hidden = [d for d in (1, 2) if down.shape[d] == gate.shape[3 - d]]
        if len(hidden) == 1:
            h = hidden[0]
            out.update({k: down.shape[h] for k in FUSED_WIDTHS["hidden"]})
            out.update({k: down.shape[3 - h] for k in FUSED_WIDTHS["inner"]})
    return {k: v for k, v in out.items() if type(getattr(m, k, None)) is int}


def _router(m) -> bool:
    w = m._parameters.get("weight")
    return w is not None and w.dim() == 2 and all(p is None or p.dim() == 1 for n, p in m._parameters.items()
                                                  if n != "weight") and \
        any(type(getattr(m, k, None)) is int for k in EXPERT_ATTRIBUTES)


@fixer(_router)
def _router_widths(m):
    """A top-k router's [E, hidden] weight: the expert count and the residual width it keeps as attributes."""
    out = {k: m.weight.shape[0] for k in EXPERT_ATTRIBUTES}
    out.update({k: m.weight.shape[1] for k in FUSED_WIDTHS["hidden"]})
    return {k: v for k, v in out.items() if type(getattr(m, k, None)) is int}


# attention modules: attribute name -> the size it holds, rewritten only where it holds that size before pruning
ATTENTION_ATTRIBUTES = {
    "num_heads": "heads", "num_attention_heads": "heads", "n_head": "heads", "n_heads": "heads",
    "num_key_value_heads": "kv", "num_kv_heads": "kv", "n_kv_heads": "kv", "kv_heads": "kv",
    "num_key_value_groups": "q_per_kv",
    "split_size": "q_width", "all_head_size": "q_width", "inner_dim": "q_width", "embed_dim": "q_width",
    "kv_dim": "kv_width",
}
ATTENTION_SIZES = {  # size name -> value from a plan entry's attention record, before or after ("before"/"after")
    "heads": lambda a, t: a[f"heads_{t}"],
    "kv": lambda a, t: a[f"kv_{t}"],
    "q_per_kv": lambda a, t: a[f"heads_{t}"] // a[f"kv_{t}"],
    "q_width": lambda a, t: a[f"heads_{t}"] * a["head_dim"],
    "kv_width": lambda a, t: a[f"kv_{t}"] * a["head_dim"],
}


def attention_attributes(mod, a: dict) -> dict:
    """New values of ``mod``'s attention attributes that hold the sizes ``a`` (a plan entry's attention
    record) had before pruning; an attribute holding anything else is left alone."""
    out = {}
    for k, size in ATTENTION_ATTRIBUTES.items():
        v = getattr(mod, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v == ATTENTION_SIZES[size](a, "before"):
            out[k] = ATTENTION_SIZES[size](a, "after")
    return out


# the residual width kept as an attribute by routers and expert blocks (``reshape(-1, self.hidden_dim)``),
# rewritten on a hidden entry's ``width_modules`` when equal to the width before pruning
WIDTH_ATTRIBUTES = ("hidden_size", "hidden_dim", "input_size", "embed_dim", "d_model", "model_dim")

# config fields per kind, for the uniform (stock-loadable) case
CONFIG_FIELDS = {
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "mlp": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "moe_intermediate_size"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts", "num_routed_experts", "moe_num_experts"),
    "hidden": ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"),
}


def _tensor_owner(model, name):
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _get_tensor(model, name):
    mod, attr = _tensor_owner(model, name)
    t = mod._parameters.get(attr)
    return t if t is not None else mod._buffers.get(attr)


def check_model(model, plan: Plan) -> dict:
    """Every planned tensor exists with the shape the plan was made for; returns name -> aliases."""
    aliases, seen = {}, {}
    for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        first = seen.setdefault(id(p), n)
        aliases.setdefault(first, []).append(n)
    by_name = {n: first for first, names in aliases.items() for n in names}
    for name, shape in plan.shapes.items():
        if name not in by_name:
            raise PlanError(f"the plan removes channels of {name}, which the model does not have")
        t = _get_tensor(model, name)
        if list(t.shape) != list(shape):
            raise PlanError(f"{name} has shape {list(t.shape)} but the plan was made for {list(shape)}: "
                            f"re-trace the model after each shrink")
    return {name: aliases[by_name[name]] for name in plan.shapes}


class _Undo:
    """What ``mask``/``shrink`` changed, put back if they fail half-way, so both are all-or-nothing."""

    _MISSING = object()

    def __init__(self, model):
        config = getattr(model, "config", None)
        self.holder = config if config is not None else model
        self.config = copy.deepcopy(vars(config)) if config is not None else None  # the record is in there
        record = self.holder.__dict__.get(records.KEY, self._MISSING)
        self.record = record if record is self._MISSING else copy.deepcopy(record)
        self.steps = []  # callables, undone last-first

    def append(self, step) -> None:
        """A callable that puts back one change (the form depgraph.depth records its module swaps in)."""
        self.steps.append(step)

    def slot(self, table: dict, key) -> None:
        """Before ``table[key]`` (a module's _parameters/_buffers entry) is replaced."""
        old = table[key]
        self.steps.append(lambda: table.__setitem__(key, old))

    def attr(self, obj, name) -> None:
        """Before ``setattr(obj, name, ...)``."""
        old = obj.__dict__.get(name, self._MISSING)
        self.steps.append(lambda: obj.__dict__.pop(name, None) if old is self._MISSING else setattr(obj, name, old))

    def values(self, t: torch.Tensor, d: int, idx: torch.Tensor) -> None:
        """Before ``t``'s entries ``idx`` along ``d`` are overwritten in place."""
        old = t.index_select(d, idx).clone()
        self.steps.append(lambda: t.index_copy_(d, idx, old))

    def undo(self) -> None:
        for step in reversed(self.steps):
            step()
        if self.config is not None:
            vars(self.holder).clear()
            vars(self.holder).update(self.config)
        if self.record is self._MISSING:
            self.holder.__dict__.pop(records.KEY, None)
        else:
            self.holder.__dict__[records.KEY] = self.record


@contextmanager
def _all_or_nothing(model):
    undo = _Undo(model)
    try:
        yield undo
    except BaseException:
        undo.undo()
        raise


@torch.no_grad()
def mask(model: nn.Module, plan: Plan) -> nn.Module:
    """Zero every planned unit in place (soft pruning), leaving shapes unchanged (offloaded weights included).
    Routed experts are also taken out of routing: their router logits become ``-inf`` (depgraph.routing), as
    in the shrunk model. All or nothing: the plan is checked (:func:`depgraph.plan.check_plan`, then against the
    model) before any tensor is touched, and a failure half-way puts every value back."""
    check_plan(plan)
    aliases = check_model(model, plan)
    with materialized(model, [a for names in aliases.values() for a in names]), _all_or_nothing(model) as undo:
        _mask(model, plan, undo)
    return model


def _mask(model, plan: Plan, undo: "_Undo") -> None:
    for name, dims in plan.removed_by_param().items():
        t = _get_tensor(model, name)
        for d, idx in dims.items():
            idx = torch.as_tensor(idx, device=t.device)
            undo.values(t, d, idx)
            t.index_fill_(d, idx, 0)
    for e in plan.entries:
        if e.experts:
            undo.append(mask_experts(model, e.experts["router_module"], e.experts["router"][0], e.units))
            for name in e.experts.get("correction", ()):  # a score-correction bias: -inf, never chosen
                t = _get_tensor(model, name)
                for d, units in (e.removed.get(name) or {0: e.units}).items():  # its expert dim, as sliced
                    idx = torch.as_tensor(units, device=t.device)
                    undo.values(t, int(d), idx)
                    t.index_fill_(int(d), idx, float("-inf"))
    return model


@torch.no_grad()
def shrink(model: nn.Module, plan: Plan, verify: bool = False) -> nn.Module:
    """Remove every planned unit in place: slice member tensors, fix module attributes and config. Weights that
    accelerate keeps offloaded (a dispatched model) are sliced in its offload too.

    All or nothing, with one undo log: the plan is checked (:func:`depgraph.plan.check_plan`, then against the
    model) before anything changes, and any failure half-way puts every tensor, attribute and the config back.
    ``verify=True`` (the default of :func:`depgraph.prune` and the CLI) first records the masked model's
    outputs on a short probe, decoder block by decoder block, then checks the shrunk blocks against them;
    a mismatch is such a failure: the model is restored and :class:`ShrinkVerifyError` names the first block
    that differs and its groups (dispatched models are not verified)."""
    check_plan(plan)
    aliases = check_model(model, plan)
    ref = None
    if verify:
        from . import verify as verifier

        ref = verifier.masked_reference(model, plan, _get_tensor)
    with materialized(model, [a for names in aliases.values() for a in names]), _all_or_nothing(model) as undo:
        _shrink(model, plan, aliases, undo)
        if ref is not None:
            verifier.compare(model, plan, ref)
    return model


def module_fixer(mod):
    """The fixer for ``mod`` (the first registered whose predicate matches), or None."""
    return next((fix for pred, fix in MODULE_FIXERS if pred(mod)), None)


def held_attributes(mod) -> set:
    """The attributes ``mod``'s fixer rewrites that hold, now, the size the fixer reads off the shapes: only
    those follow a shrink (an attribute holding anything else is left alone)."""
    fix = module_fixer(mod)
    if fix is None:
        return set()
    try:
        return {k for k, v in fix(mod).items() if getattr(mod, k, None) == v}
    except Exception:  # noqa: BLE001 - a fixer that cannot read the module fixes nothing
        return set()


def fixer_dims(mod) -> dict:
    """{attribute: (parameter name, dim)} for the attributes of :func:`held_attributes` that ``mod``'s fixer reads
    off one parameter dim alone: each dim of each own parameter is grown by one on a meta copy and the values that
    move are that dim's (``Conv1D.nf``: ``("weight", 1)``)."""
    fix, held = module_fixer(mod), held_attributes(mod)
    if fix is None or not held:
        return {}
    before = fix(mod)
    moved: dict = {}
    for pname, p in mod._parameters.items():
        if p is None:
            continue
        for d in range(p.dim()):
            twin = copy.copy(mod)
            twin._parameters = dict(mod._parameters)
            shape = list(p.shape)
            shape[d] += 1
            twin._parameters[pname] = torch.empty(shape, device="meta")
            try:
                after = fix(twin)
            except Exception:  # noqa: BLE001 - a fixer that cannot read the grown copy proves nothing
                continue
            for k in held:
                if after.get(k) != before.get(k):
                    moved.setdefault(k, []).append((pname, d))
    return {k: dims[0] for k, dims in moved.items() if len(dims) == 1 and isinstance(before.get(k), int)}


def _shrink(model, plan: Plan, aliases: dict, undo: "_Undo") -> None:
    record = records.get(model)
    changed_modules = {}
    held = {}  # module path -> attributes its fixer rewrites, read before any tensor is sliced
    for name in plan.removed_by_param(blocks=False):
        for alias in aliases[name]:
            path = alias.rpartition(".")[0]
            if path not in held:
                held[path] = held_attributes(model.get_submodule(path) if path else model)
    for name, dims in plan.removed_by_param(blocks=False).items():
        old = _get_tensor(model, name)
        new = old
        for d, idx in dims.items():
            keep = torch.ones(old.shape[d], dtype=torch.bool)
            keep[idx] = False
            new = new.index_select(d, keep.nonzero().squeeze(1).to(old.device))
        new = new.contiguous()
        for alias in aliases[name]:
            mod, attr = _tensor_owner(model, alias)
            store = mod._parameters if attr in mod._parameters else mod._buffers
            undo.slot(store, attr)
            if store is mod._parameters:
                store[attr] = nn.Parameter(new, requires_grad=old.requires_grad) \
                    if not isinstance(new, nn.Parameter) else new
                new = store[attr]
            else:
                store[attr] = new
            changed_modules[alias.rpartition(".")[0]] = mod
    for path, mod in changed_modules.items():
        fix = module_fixer(mod)
        if fix is not None:
            _set_attrs(mod, {k: v for k, v in fix(mod).items() if k in held.get(path, ())}, record, path, undo)
    for e in plan.entries:
        if e.attention:
            for path in e.attention.get("modules") or [e.attention["module"]]:
                mod = model.get_submodule(path)
                _set_attrs(mod, attention_attributes(mod, e.attention), record, path, undo)
        if e.experts:
            _set_counts(model, e.experts["modules"], EXPERT_ATTRIBUTES, e.num_units, e.units_after, record, undo)
        if e.width_modules:
            _set_counts(model, e.width_modules, WIDTH_ATTRIBUTES, e.num_units, e.units_after, record, undo)
    _update_config(model, plan, record)
    if apply_blocks(model, plan, record, undo):  # depth: skipped sub-blocks, dropped layers (depgraph.depth)
        config = getattr(model, "config", None)
        record["uniform"] = not record.get("skipped") and config is not None and _builds_same_shapes(model, config)


def _set_counts(model, paths, names, before: int, after: int, record: dict, undo: "_Undo | None" = None) -> None:
    """Set the int attributes ``names`` of the modules at ``paths`` that equal ``before`` to ``after``."""
    for path in paths:
        mod = model.get_submodule(path)
        values = {k: after for k in names if type(getattr(mod, k, None)) is int and getattr(mod, k) == before}
        _set_attrs(mod, values, record, path, undo)


def _set_attrs(mod, values: dict, record: dict, path: str, undo: "_Undo | None" = None) -> None:
    for k, v in values.items():
        if undo is not None:
            undo.attr(mod, k)
        setattr(mod, k, v)
    records.set_module_attrs(record, path, values)


def _update_config(model, plan: Plan, record: dict) -> None:
    """Record per-layer widths; when every layer has the same shape, write them into the standard
    config fields so stock ``from_pretrained`` loads the result (checked by rebuilding on meta)."""
    layers = record["layers"]
    after = {"heads": set(), "kv": set(), "mlp": set(), "hidden": set(), "head_dim": set(), "experts": set()}
    for e in plan.entries:
        key = str(e.layer) if e.layer is not None else "all"
        if e.attention:
            a = e.attention
            layers.setdefault(key, {}).update(num_attention_heads=a["heads_after"], num_key_value_heads=a["kv_after"],
                                              head_dim=a["head_dim"])
            after["heads"].add(a["heads_after"])
            after["kv"].add(a["kv_after"])
            after["head_dim"].add(a["head_dim"])
        elif e.kind == "mlp":
            layers.setdefault(key, {})["intermediate_size"] = e.units_after
            after["mlp"].add(e.units_after)
        elif e.kind == "experts":
            layers.setdefault(key, {})["num_experts"] = e.units_after
            after["experts"].add(e.units_after)
        elif e.kind == "hidden":
            record["hidden_size"] = e.units_after
            after["hidden"].add(e.units_after)
    config = getattr(model, "config", None)
    if config is None:
        return
    candidate = copy.deepcopy(config)
    # composite configs keep the language model's sizes (vocab_size, hidden_size, ...) on text_config
    target = candidate.get_text_config() if hasattr(candidate, "get_text_config") else candidate
    for kind, values in after.items():
        if len(values) != 1 or kind == "head_dim":
            continue
        (v,) = values
        for f in CONFIG_FIELDS[kind]:
            if isinstance(_read(target, f), int):
                setattr(target, f, v)
    if len(after["head_dim"]) == 1:  # models that derive head_dim from hidden/heads read it when set
        try:
            target.head_dim = next(iter(after["head_dim"]))
        except AttributeError:  # a read-only property (derived from hidden/heads): the rebuild check decides
            pass
    uniform = _builds_same_shapes(model, candidate)
    record["uniform"] = uniform  # stock from_pretrained rebuilds these shapes
    if uniform:
        config.__dict__.update({k: v for k, v in vars(candidate).items()
                                if k != "depgraph" and config.__dict__.get(k, _MISSING) != v})


_MISSING = object()


def _read(config, field):
    """A config field, or None (heterogeneous transformers configs raise on per-layer fields read globally)."""
    try:
        return getattr(config, field, None)
    except Exception:  # noqa: BLE001
        return None


def _builds_same_shapes(model, config) -> bool:
    try:
        with torch.device("meta"):
            twin = type(model)(config)
    except Exception:  # noqa: BLE001 - any failure means "not stock-loadable"
        return False
    mine = {n: tuple(p.shape) for n, p in model.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in twin.named_parameters()}
    return mine == theirs
