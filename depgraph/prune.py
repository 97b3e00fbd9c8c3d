"""prune: trace, score, plan and shrink in one call, with a report of what was removed."""
from __future__ import annotations

import time

import torch

from .block_scores import score_blocks
from . import record as records
from .compensate import apply_bias, bias_deltas
from .dispatch import is_dispatched
from .errors import PlanError
from .graph import trace
from .importance import methods, score
from .plan import Budget, Plan, check_ratio, check_round_to, check_target, check_target_of, select_groups
from .prune_report import PruneReport
from .reconstruct import ReconstructConfig, obs_reselector, reconstruct as refit_consumers
from .shrink import shrink


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _numel(model, names) -> int:
    """Elements of the parameters ``names`` of ``model`` now (a meta model counts too)."""
    return sum(model.get_parameter(n).numel() for n in names)


DEFAULT_KINDS = ("mlp",)
WIDE_KINDS, WIDE_TARGET = ("attention", "mlp"), 0.5  # at half the parameters or more heads join the neurons


def default_kinds(target: float | None) -> tuple:
    """The group kinds pruned when none are given, by ``target`` (None: the default target): MLP neurons below
    half of all parameters, heads and neurons from there on. Measured on SmolLM2 (bench/results/prune.md, first
    64 WikiText-2 windows, re-fit): heads + MLP lose at 20-30% (30%: 4.52x dense against 3.13x, self-generated
    calibration) and win at 50% (12.2x against 33.4x; 5.70x against 13.3x with WikiText-2 validation text).
    The threshold applies to the target in the unit it is given in (``target_of``): on Gemma 3 270M at 50% of the
    non-embedding parameters heads + MLP give 8.98x dense against 9.95x for MLP alone
    (bench/results/second_model.md, first 64 windows)."""
    return WIDE_KINDS if target is not None and target >= WIDE_TARGET else DEFAULT_KINDS


def auto_layers(graph) -> list:
    """``layers="auto"``: every layer of ``graph`` but the first and the last (all of them when <= 2)."""
    found = sorted({g.layer for g in graph.groups() if g.layer is not None})
    return found[1:-1] if len(found) > 2 else found


def step_target(original: int, current: int, target: float, step: int, steps: int) -> float:
    """Fraction of the ``current`` parameters to remove at ``step`` of ``steps`` so that ``target`` of the
    ``original`` ones are gone after the last step."""
    goal = original * (1 - target * step / steps)  # parameters left after this step
    return max(0.0, 1 - goal / current)


def record_groups(groups: dict, plan, scores: dict) -> None:
    """Add ``plan``'s entries to the report's per-group records ``groups`` (first scores, last widths)."""
    for e in plan.entries:
        first = groups.setdefault(e.group, {"group": e.group, "kind": e.kind, "layer": e.layer,
                                            "units_before": e.num_units,
                                            "scores": [float(x) for x in scores[e.group]]})
        first["units_after"] = e.units_after
        first["params_removed"] = first.get("params_removed", 0) + Plan([e], plan.shapes).params_removed()


DEFAULT_TARGET = 0.2
# prune(select=...): the plan's units, re-chosen by greedy OBS during the re-fit, or by OBS among twice as many
# units of lowest score
SELECTS = ("scores", "obs", "shortlist")
SHORTLIST = 2.0


def check_args(target, method, steps, compensate, calibration, ratios, reconstruct=False, round_to=8,
               target_of="all"):
    """The argument checks shared by the in-memory and the streamed prune (raised before any work); returns the
    target to prune to (``None`` -> :data:`DEFAULT_TARGET`; stays None with ``ratios``)."""
    check_target_of(target_of)
    if ratios is not None:
        if target is not None:
            raise PlanError("give either a parameter target or per-kind ratios, not both")
        if target_of != "all":
            raise PlanError(f"target_of={target_of!r} says what a parameter target is a fraction of; per-kind ratios "
                            "are fractions of each group's units: give a target, or leave target_of at 'all'")
        if steps != 1:
            raise PlanError("per-kind ratios are applied in one step; use a parameter target with steps > 1")
    else:
        target = DEFAULT_TARGET if target is None else target
        check_ratio(target)
    check_round_to(round_to)
    if method not in methods():
        raise PlanError(f"unknown method {method!r}; choose one of {', '.join(methods())}")
    if not isinstance(steps, int) or steps < 1:
        raise PlanError(f"steps must be a positive integer, got {steps!r}")
    if compensate and calibration is None:
        raise PlanError("compensate=True needs calibration data (the removed units' mean activations)")
    if reconstruct and calibration is None:
        raise PlanError("reconstruct=True needs calibration data (the consumers' input Gram matrices)")
    return target


def check_graph(graph, target, kinds, layers, round_to: int = 8, gqa: str = "heads", ratios=None,
                target_of: str = "all") -> None:
    """The checks right after the trace, shared by the in-memory and the streamed prune: layers outside the model
    or with nothing to prune, and (without ``ratios``) a target that cannot be met."""
    select_groups(graph, kinds, layers)
    if ratios is None and "block" not in kinds:  # depth plans: Plan.from_scores checks what blocks can go
        check_target(graph, target, kinds, layers, round_to, gqa, target_of)


def _has_blocks(model) -> bool:
    from .sparsify import SparsifyError, find_layers

    try:
        find_layers(model)
    except SparsifyError:
        return False
    return True


def _widths(groups) -> dict:
    """{layer: {kind: units kept}} for the pruned per-layer groups (the per-layer widths a policy chose)."""
    out: dict = {}
    for g in groups:
        if g["layer"] is not None:
            out.setdefault(str(g["layer"]), {})[g["kind"]] = g["units_after"]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def refit_summary(layers) -> list:
    """Per consumer: removed columns and the output error relative to ``||W X||^2`` before and after the re-fit."""
    out = []
    for rec in layers:
        for path, v in rec["consumers"].items():
            row = {"layer": rec["layer"], "consumer": path, "removed": v["removed"]}
            if "signal" in v and v["signal"] > 0:
                row["rel_error_before"] = v["error_before"] / v["signal"]
                row["rel_error_after"] = v["error_after"] / v["signal"]
            out.append(row)
    return out


def prune(model, calibration=None, target: float | None = None, method: str = "activation", kinds=None,
          policy: str = "uniform", layers="auto", round_to: int = 8, gqa: str = "heads", aggregate: str = "sum",
          normalize=None, steps: int = 1, uniform: bool = False, compensate: bool = False,
          ratios: dict | None = None, progress: bool = True, reconstruct: bool | None = None, damp: float = 1.0,
          stream: bool = False, checkpoint=None, output=None,
          verify: bool = True, block_method: str = "influence", depth_share: float | None = None,
          select: str = "scores", gram_dtype: torch.dtype | None = None, target_of: str = "all"):
    """Shrink ``model`` in place by ``target`` (default 0.2) of its parameters; returns (model, report, plans).
    ``target_of``: what the target is a fraction of: ``"all"`` (default) the parameters, embeddings included, or
    ``"non-embedding"`` all but the embedding parameters (``DependencyGraph.embedding_params``: the tables the
    graph's embedding ops read, position tables included, and the output head, tied or untied), the convention of
    the scaling-law papers and Minitron. On a model whose token table is most of it (Gemma 3 270M: 63%) a target
    of all parameters falls on the rest several times over (0.2 removes 53% of it); there ``target_of=
    "non-embedding"`` is the one that means "a fifth smaller". The report gives both fractions. The default kinds
    (``kinds=None``) follow the target in the unit given. A target that cannot be met (every group at its minimum)
    is refused with the largest reachable fraction, in the same unit, right after the trace; so are layers outside
    the model.

    ``stream=True`` prunes a checkpoint larger than memory one decoder block at a time
    (:func:`depgraph.stream.prune_streamed`): ``model`` is then a model folder of safetensors shards (or a model
    on the meta device, with ``checkpoint`` its folder), ``output`` the folder to write, and the returned model
    lives on the meta device (shapes only).

    Defaults come from bench/results/prune.md on SmolLM2: gradient-free activation scores (|w| times
    the input feature's norm; with FLAP's ``fluctuation`` the best scores at 20% and 30%, within about 5% of
    each other, and no backward pass), ``kinds=None``: MLP neurons only below a target of 0.5 (a 9-head GQA layer
    loses a third of its heads at the smallest legal step), attention heads and MLP neurons from 0.5 on
    (:func:`default_kinds`), and ``layers="auto"``:
    every layer but the first and the last, which are the most sensitive (LLM-Pruner keeps them too).
    ``layers=None`` prunes every layer.

    ``calibration``: token ids [N, L] (:func:`depgraph.calibration.load_calibration`), needed by the
    gradient and activation methods. ``steps > 1`` prunes iteratively, re-tracing and re-scoring after
    each partial shrink. ``uniform=True`` keeps every layer the same shape (same fraction of every
    group, all layers), so stock ``from_pretrained`` loads the result. ``compensate=True`` folds removed
    units' mean contribution over the calibration tokens into the consumer's bias (FLAP).
    ``reconstruct=True`` re-fits the kept input columns of every consumer (the layer that reads the removed
    units: ``down_proj`` for neurons, ``o_proj`` for heads) by least squares on the calibration inputs, block by
    block on the outputs of the already-pruned blocks (:mod:`depgraph.reconstruct`; ``damp`` is the ridge added
    to the Gram matrix as a fraction of its mean diagonal); with ``compensate=True`` too, the bias joins the fit.
    Both are done before each shrink. ``reconstruct=None`` (the default) re-fits whenever ``calibration`` is given
    (and the model is not dispatched by accelerate),
    with ``damp=1.0``: on SmolLM2 at 20% this beats no re-fit (1.96-1.98x dense against 2.12x, first 64 WikiText-2
    windows) and at 30% by more (3.13x against 3.93x), where damp 0.01 loses (3.17x at 20%: 640 calibration tokens
    against a 1536-wide Gram matrix overfit); bench/results/prune.md, the study table. Those rows used the old
    self-generated 10 x 64 tokens (temperature 1); the CLI's data-free default now is 32 x 64 tokens of
    :class:`depgraph.calibration.SelfSampling` (temperature 2 -> 0.8 over the first 16 tokens, no special
    tokens): 1.93x at 20% (PTB 1.70x against 1.96x) and 2.75x at 30% (PTB 2.42x against 3.01x).
    ``verify`` (default on): each shrink is checked against its mask on a short probe, block by block
    (:func:`depgraph.shrink`); a mismatch restores the model and raises ``ShrinkVerifyError``.
    ``"block"`` in ``kinds`` adds depth pruning (whole layers and attention/MLP sub-blocks, depgraph.blocks), scored
    by ``block_method`` (``influence``: ShortGPT's Block Influence, or ``loss``: the calibration-loss increase,
    depgraph.block_scores); ``depth_share`` is the part of the target depth takes (see ``Plan.from_scores``).
    ``select``: ``"scores"`` (default) removes the units the plan chose from ``method``'s scores; ``"obs"`` keeps
    the plan's widths but re-chooses each group's units during the re-fit, block by block on the sequential
    calibration inputs, by greedy Optimal Brain Surgeon on the consumer (ZipLM / SlimGPT: the unit whose removal
    leaves the least re-fit error, H^-1 downdated after each round of 8; GQA heads and experts keep the plan's
    units); ``"shortlist"``: the same, OBS choosing only among twice as many units of lowest ``method`` score;
    both need the re-fit. ``gram_dtype``: the dtype the re-fit accumulates ``X^T X`` in and solves in (None:
    float32 for half-precision weights, float64 otherwise: :func:`depgraph.reconstruct.gram_dtype_for`).
    """
    kinds = default_kinds(target) if kinds is None and ratios is None else tuple(kinds or ())
    dispatched = isinstance(model, torch.nn.Module) and is_dispatched(model)
    if reconstruct is None:  # the measured default: re-fit whenever there is calibration data to fit on
        reconstruct = calibration is not None and not dispatched
    if select not in SELECTS:
        raise PlanError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
    if select != "scores" and not reconstruct:
        raise PlanError(f"select={select!r} re-chooses units during the re-fit: it needs reconstruct and "
                        "calibration data")
    if select != "scores" and stream:
        raise PlanError(f"select={select!r} does not run with stream=True")
    if reconstruct and dispatched:
        raise PlanError("reconstruct=True does not run on an accelerate-dispatched model (the re-fit writes weights "
                        "that live in its offload); pass reconstruct=False, or load the model undispatched")
    if stream and "block" in kinds:
        raise PlanError("depth pruning (kinds with 'block') does not run with stream=True")
    if stream:
        from .stream import StreamSettings, prune_streamed

        settings = StreamSettings(target=target, target_of=target_of, method=method, kinds=tuple(kinds),
                                  policy=policy, layers=layers,
                                  round_to=round_to, gqa=gqa, aggregate=aggregate, normalize=normalize,
                                  steps=steps, uniform=uniform, compensate=compensate, ratios=ratios,
                                  progress=progress, reconstruct=reconstruct, damp=damp, gram_dtype=gram_dtype)
        return prune_streamed(model, calibration, output, settings, checkpoint=checkpoint)
    target = check_args(target, method, steps, compensate, calibration, ratios, reconstruct, round_to, target_of)
    if "block" in kinds and steps != 1:
        raise PlanError("depth pruning (kinds with 'block') runs in one step: layers are renumbered by each shrink")
    if ratios is not None:
        kinds = tuple(ratios)
    refit_config = ReconstructConfig(mode="lstsq" if reconstruct else "mean", intercept=compensate, damp=damp,
                                     gram_dtype=gram_dtype)
    if uniform:
        policy, layers = "uniform", None
    if isinstance(layers, str) and layers != "auto":
        raise PlanError(f"layers must be 'auto', None or a list of layer indices, got {layers!r}")
    original = _params(model)
    times = {"trace_s": 0.0, "score_s": 0.0, "plan_s": 0.0, "reconstruct_s": 0.0, "shrink_s": 0.0}
    refits = []
    groups, plans = {}, []
    dense_graph = base = None
    for step in range(1, steps + 1):
        t = time.perf_counter()
        graph = trace(model)
        times["trace_s"] += time.perf_counter() - t
        if layers == "auto":  # read off the first graph
            layers = auto_layers(graph)
        if step == 1:  # refuse layers outside the model or an unreachable target now, not after the scoring
            check_graph(graph, target, kinds, layers, round_to, gqa, ratios, target_of)
            dense_graph = graph
        current = _params(model) if target_of == "all" else Budget.of(graph, target_of).total
        base = current if base is None else base
        t = time.perf_counter()
        width = tuple(k for k in kinds if k != "block")
        scores = score(model, graph, calibration, method=method, aggregate=aggregate, normalize=normalize,
                       kinds=width, progress=progress) if width else {}
        if "block" in kinds:
            scores.update(score_blocks(model, graph, calibration, method=block_method, layers=layers))
        times["score_s"] += time.perf_counter() - t
        fraction = None if ratios is not None else step_target(base, current, target, step, steps)
        t = time.perf_counter()
        plan = Plan.from_scores(graph, scores, fraction, kinds=kinds, policy=policy, layers=layers,
                                round_to=round_to, gqa=gqa, ratios=ratios, depth_share=depth_share,
                                target_of=target_of)
        times["plan_s"] += time.perf_counter() - t
        t = time.perf_counter()
        deltas = {}
        if compensate and not reconstruct and not _has_blocks(model):  # no decoder blocks: one dense pass
            deltas = bias_deltas(model, plan, calibration)
        elif reconstruct or compensate:
            reselect = None if select == "scores" else \
                obs_reselector(graph, damp, scores=scores, shortlist=SHORTLIST if select == "shortlist" else 0.0)
            refit = refit_consumers(model, plan, calibration, refit_config, reselect=reselect)
            plan = refit["plan"]
            deltas = refit["bias"]
            refits.append(refit["layers"])
        times["reconstruct_s"] += time.perf_counter() - t
        t = time.perf_counter()
        shrink(model, plan, verify=verify)
        apply_bias(model, deltas)
        times["shrink_s"] += time.perf_counter() - t
        plans.append(plan)
        record_groups(groups, plan, scores)
    settings = {"method": method, "select": select, "target": target,
                "target_of": None if ratios is not None else target_of, "policy": policy, "steps": steps,
                "uniform": uniform,
                "compensate": compensate, "reconstruct": reconstruct, "damp": damp if reconstruct else None,
                "reconstruction": refit_summary(refits[-1]) if refits else None,
                "layers": layers, "round_to": round_to, "gqa": gqa, "ratios": ratios,
                "block_method": block_method if "block" in kinds else None, "depth_share": depth_share,
                "removed_blocks": [e.group for p in plans for e in p.entries if e.block]}
    return model, build_report(model, original, settings, times, groups, dense_graph), plans


def build_report(model, original: int, settings: dict, times: dict, groups: dict, graph) -> PruneReport:
    """The prune report: ``settings`` (method, target, ...), parameter counts of ``model`` after pruning
    (a meta model counts too) against ``original``, both as a fraction of all parameters and of the non-embedding
    ones (``graph``: the dense model's, whose ``embedding_params`` say which are embeddings), ``times`` and the
    per-group records."""
    after = _params(model)
    names = graph.embedding_params
    emb_before, emb_after = graph.num_embedding_params, _numel(model, names)
    layers = settings.get("layers")
    return PruneReport(
        **{**settings, "layers": None if layers is None else sorted(layers)},
        params_before=original, params_after=after, removed_fraction=(original - after) / original,
        non_embedding_removed_fraction=((original - emb_before) - (after - emb_after)) / (original - emb_before),
        embedding={"params": list(names), "before": emb_before, "after": emb_after},
        stock_loadable=bool((records.get(model, create=False) or {}).get("uniform")),
        times=times, groups=list(groups.values()), widths=_widths(groups.values()),
    )
