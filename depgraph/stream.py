"""stream: prune a checkpoint larger than memory, one decoder block resident at a time.

:func:`prune_streamed` runs the stages of :func:`depgraph.prune` block by block; the per-block math is the in-memory
path's own (``importance.moment_hooks`` and ``score``, ``Plan.from_scores``, ``shrink.mask`` and ``shrink``), so the
two give the same plan and the same weights. Lifecycle:

1. **skeleton**: the model built from ``config.json`` on the meta device (buffers such as rotary frequencies real),
   traced into its dependency graph (the trace never needs weights);
2. **capture**: the tensors outside the decoder blocks, but the output head, read from the safetensors shards; the
   calibration rows run one at a time up to the first block (``sparsify.capture_layer_inputs``); those tensors
   dropped again;
3. **score pass**: per block, its tensors read from the shards (each shard opened memory-mapped only while it is
   read), the input statistics collected while it runs on the carried hidden states, its groups scored, its
   (dense) outputs carried to the next block, its tensors dropped. These are exactly the statistics of the
   in-memory prune, which scores the dense model;
4. **plan**: ``Plan.from_scores`` on the whole graph with every block's scores (the parameter budget is global, so
   the uniform and the global policy both work);
5. **write pass**: per block, read; with ``reconstruct=True`` its consumers re-fitted on the hidden states the
   already-pruned blocks produce (``reconstruct.reconstruct_block``, calibration batched as in memory); mask and
   run it on a probe (the first calibration row's inputs), shrink and run
   it again (verify: the outputs agree), write its tensors as one shard of a temporary folder, drop them; then the
   other tensors, ``config.json`` with depgraph's record (``load_pruned`` rebuilds the shapes), the checkpoint's
   tokenizer files, ``plan.json`` and ``report.json``; the folder is renamed into place.

Memory: one block in the checkpoint's dtype (bf16 stays bf16 on disk; statistics are float64 sums, scores float32;
``compute_dtype=torch.float32`` runs the block math on an fp32 copy of the one resident block), the embedding table
during the capture, the carried hidden states [rows, seq_len, hidden] and the graph.
Gradient methods need a backward pass through the whole model and are refused.
"""
from __future__ import annotations

import gc
import json
import resource
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from . import card, remote_code
from . import record as records
from .errors import LoadError, PlanError
from .graph import trace
from .importance import GRADIENT_METHODS, STATS_FROM_MOMENTS, moment_hooks, score
from .io import atomic_folder, config_shapes
from .outdir import check_output
from .plan import Plan, dump_plans
from .prune import (auto_layers, default_kinds, build_report, check_args, check_graph, record_groups, refit_summary,
                    step_target)
from .reconstruct import ReconstructConfig, consumers, gram_dtype_for, reconstruct_block
from .shrink import mask, shrink
from .sparsify import batches_of, capture_layer_inputs, find_layers, run_layer
from .stats import check_token_ids

STREAM_METHODS = ("activation", "fluctuation", "magnitude", "l1", "l2", "random")
SELF_CALIBRATION = ("--calib self samples text from the whole model, which --stream never holds; calibrate with "
                    "wikitext2, ptb, alpaca, a text/JSON/JSONL file or a Hugging Face dataset")
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_NOT_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


@dataclass
class StreamSettings:
    """What :func:`depgraph.prune` takes, for the streamed path (same meanings and defaults)."""

    target: float | None = None  # None: depgraph.prune's default (0.2); not with ratios
    target_of: str = "all"  # what the target is a fraction of: "all" or "non-embedding" parameters
    method: str = "activation"
    kinds: tuple | None = None  # None: prune.default_kinds(target), as depgraph.prune and the CLI choose
    policy: str = "uniform"
    layers: object = "auto"
    round_to: int = 8
    gqa: str = "heads"
    aggregate: str = "sum"
    normalize: str | None = None
    steps: int = 1
    uniform: bool = False
    compensate: bool = False
    reconstruct: bool | None = None  # least-squares re-fit of each block's consumers (depgraph.reconstruct),
    # sequential; None: on when calibration is given (depgraph.prune's default)
    damp: float = 1.0
    ratios: dict | None = None
    progress: bool = True
    overwrite: bool = False  # replace a non-empty output folder depgraph did not write (never the checkpoint)
    log: str | None = None  # a file that gets one JSON line per finished block (partial results of long runs)
    dtype: torch.dtype | None = None  # None: the checkpoint's dtype (that of the output weights)
    compute_dtype: torch.dtype | None = None  # the block math's dtype; None: ``dtype``. float32 on CPUs without
    # native bf16 matmuls is ~10x faster than bf16 (bench/results/scale.md) and exact to upcast/downcast
    gram_dtype: torch.dtype | None = None  # the re-fit's X^T X; None: by the checkpoint's dtype (float32 for bf16 or
    # fp16 weights, float64 otherwise: reconstruct.gram_dtype_for), whatever ``compute_dtype`` is


# -- the checkpoint on disk ---------------------------------------------------------------------
class Checkpoint:
    """The safetensors shards of a model folder: ``{tensor name: shard}`` from ``model.safetensors.index.json``
    (or the single ``model.safetensors``); :meth:`read` opens each shard memory-mapped only while reading."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise LoadError(f"{self.folder}: no config.json; --stream needs a model folder")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise LoadError(f"{self.folder}: no *.safetensors shards; --stream reads safetensors only "
                                f"(convert .bin weights with save_pretrained(safe_serialization=True))")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    self.where.update({k: f for k in handle.keys()})
        missing = sorted({str(f.name) for f in self.where.values() if not f.is_file()})
        if missing:
            raise LoadError(f"{self.folder}: shard(s) named in the index are missing: {', '.join(missing)}")

    def read(self, names) -> dict:
        """``{name: tensor}`` (copies, so the shards are unmapped again on return)."""
        from safetensors import safe_open

        by_file: dict = {}
        for n in names:
            if n not in self.where:
                raise LoadError(f"{self.folder}: the checkpoint has no tensor {n}")
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for k in keys:
                    out[k] = handle.get_tensor(k).clone()
        return out


def skeleton(folder, dtype=None):
    """The model of ``folder``'s config.json with every parameter on the meta device (buffers real), in the
    checkpoint's dtype (or ``dtype``), tied weights tied, eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _put(model, tensors: dict, aliases: dict, device="cpu") -> None:
    """Materialize ``tensors`` (canonical names) in ``model`` on ``device``; tied names share the one tensor."""
    from accelerate.utils import set_module_tensor_to_device

    for name, t in tensors.items():
        set_module_tensor_to_device(model, name, device, value=t)
        for alias in aliases.get(name, [name]):
            if alias != name:
                owner, _, attr = alias.rpartition(".")
                model.get_submodule(owner)._parameters[attr] = model.get_parameter(name)


def _drop(model, names, aliases: dict) -> None:
    """Put ``names`` (and their aliases) back on the meta device with their current shapes, freeing memory."""
    _put(model, {n: None for n in names}, aliases, "meta")


class BlockGraph:
    """The groups of one decoder block of ``graph``, for :func:`depgraph.importance.score`."""

    def __init__(self, graph, layer: int):
        self.aliases = graph.aliases
        self._groups = [g for g in graph.groups() if g.layer == layer]

    def groups(self, kinds=None) -> list:
        if kinds is None:
            return list(self._groups)
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        return [g for g in self._groups if g.kind in kinds]


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def check_settings(settings: StreamSettings) -> float | None:
    """One-line refusals of what streaming cannot do, before anything is read or written (with the in-memory
    prune's own argument checks, :func:`depgraph.prune.check_args`); returns the target to prune to."""
    target = check_args(settings.target, settings.method, settings.steps, False, None, settings.ratios,
                        round_to=settings.round_to, target_of=settings.target_of)
    if settings.method in GRADIENT_METHODS:
        raise PlanError(f"method {settings.method!r} needs gradients, i.e. a backward pass through the whole model, "
                        f"which --stream never holds; stream with {', '.join(STREAM_METHODS)}, or load the model "
                        f"dispatched with accelerate (device_map) and prune in memory")
    if settings.method not in STREAM_METHODS:
        raise PlanError(f"method {settings.method!r} cannot be streamed; use one of {', '.join(STREAM_METHODS)}")
    if settings.steps != 1:
        raise PlanError("--stream prunes in one step (steps=1)")
    if settings.compensate:
        raise PlanError("--stream does not fold bias compensation yet; prune in memory for --compensate")
    if isinstance(settings.layers, str) and settings.layers != "auto":
        raise PlanError(f"layers must be 'auto', None or a list of layer indices, got {settings.layers!r}")
    return target


def _check_groups(graph, kinds, n_blocks: int) -> None:
    for g in graph.groups(kinds):
        if g.layer is None or not 0 <= g.layer < n_blocks:
            raise PlanError(f"group {g.id} ({g.kind}) spans more than one decoder block "
                            f"({g.members[0].param}, ...); --stream prunes attention and mlp groups only")


# -- the lifecycle ------------------------------------------------------------------------------
PROBE_LEN = 16  # tokens of the probe row when no calibration is given (magnitude, l1, l2, random)
SHARD_BYTES = 1 << 29  # tensors outside the blocks go to shards of at most this size (one tensor may exceed it)


def prune_streamed(model, calibration, output, settings: StreamSettings = StreamSettings(), checkpoint=None):
    """Prune the checkpoint folder ``model`` (or the meta-device ``model`` whose weights are in the folder
    ``checkpoint``) one block at a time and write the pruned model to ``output`` (atomically).

    Returns ``(meta model with the pruned shapes, report, [plan])`` like :func:`depgraph.prune`; the report adds
    ``stream``: per-block times and memory, the peak RSS, and the verification error of every block.
    """
    if output is None:
        raise PlanError("stream=True needs output=FOLDER: the pruned weights are written block by block")
    if settings.reconstruct is None:
        settings = replace(settings, reconstruct=calibration is not None)
    target = check_settings(settings)
    if settings.method in STATS_FROM_MOMENTS or settings.reconstruct:
        if calibration is None:
            raise PlanError(f"{'reconstruct=True' if settings.reconstruct else 'method ' + repr(settings.method)} "
                            f"needs calibration token ids")
        check_token_ids(calibration)
    if isinstance(model, torch.nn.Module):
        if checkpoint is None:
            raise PlanError("stream=True with a model object needs checkpoint=FOLDER (its safetensors shards)")
        folder = Path(checkpoint)
    else:
        folder, model = Path(model), None
    check_output(output, settings.overwrite, [folder])  # OUT refused before any work, not after the blocks
    ckpt = Checkpoint(folder)
    t_start = time.perf_counter()
    times = {"trace_s": 0.0, "capture_s": 0.0, "score_s": 0.0, "plan_s": 0.0, "shrink_s": 0.0}
    if model is None:
        model = skeleton(folder, settings.dtype)
    kinds = tuple(settings.ratios) if settings.ratios is not None else \
        tuple(settings.kinds) if settings.kinds is not None else default_kinds(settings.target)
    policy, layers = settings.policy, settings.layers
    if settings.uniform:
        policy, layers = "uniform", None

    # 1. graph and names
    t = time.perf_counter()
    graph = trace(model)
    times["trace_s"] = time.perf_counter() - t
    if layers == "auto":
        layers = auto_layers(graph)
    layers_path, blocks = find_layers(model)
    _check_groups(graph, kinds, len(blocks))
    check_graph(graph, target, kinds, layers, settings.round_to, settings.gqa, settings.ratios, settings.target_of)
    aliases = {c: names for c, names in graph.aliases.items()}
    canon_of = {a: c for c, names in aliases.items() for a in names}
    every = list(dict.fromkeys(canon_of.get(n, n) for n in model.state_dict(keep_vars=True)))
    missing = [n for n in every if n not in ckpt.where]
    if missing:
        raise LoadError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model has, e.g. {missing[0]} "
                        f"(its names must match the model's state dict)")
    block_names = [[n for n in every if n.startswith(f"{layers_path}.{i}.")] for i in range(len(blocks))]
    outside = [n for n in every if not n.startswith(layers_path + ".")]
    head = model.get_output_embeddings()
    head_only = {canon_of.get(n, n) for n, _ in model.named_parameters(remove_duplicate=False)
                 if head is not None and n.startswith(_module_path(model, head) + ".")
                 and len(aliases.get(canon_of.get(n, n), [n])) == 1}
    original = sum(p.numel() for p in model.parameters())
    block_log = [{"block": i} for i in range(len(blocks))]

    # 2. the first block's inputs: every calibration row, one at a time (as the in-memory statistics pass runs
    #    them), or one probe row for the methods without calibration
    t = time.perf_counter()
    needs_stats = settings.method in STATS_FROM_MOMENTS
    rows = check_token_ids(calibration) if needs_stats else \
        torch.randint(0, model.config.vocab_size, (1, PROBE_LEN), generator=torch.Generator().manual_seed(0))
    embed = [n for n in outside if n not in head_only]
    dtype = model.dtype
    compute = settings.compute_dtype or dtype
    carried = _capture(model, ckpt, embed, aliases, blocks, list(rows[:, None]), compute)
    times["capture_s"] = time.perf_counter() - t

    # 3. score pass: dense blocks, dense hidden states carried forward
    scores = score(model, graph, None, method="random", kinds=kinds, normalize=settings.normalize) \
        if settings.method == "random" else {}
    probes = {}
    bar = tqdm(total=2 * len(blocks), desc="stream: score blocks", unit="block", disable=not settings.progress)
    for i, block in enumerate(blocks):
        t = time.perf_counter()
        _put(model, ckpt.read(block_names[i]), aliases)
        block.to(compute)
        view = BlockGraph(graph, i)
        probes[i] = [carried[0][0].clone(), carried[0][1], carried[0][2]]
        with torch.no_grad(), moment_hooks(model, view) as moments:
            for item in carried:
                item[0] = run_layer(block, item)
        if settings.method != "random":
            stats = STATS_FROM_MOMENTS[settings.method](moments) if needs_stats else None
            scores.update(score(model, view, None, method=settings.method, aggregate=settings.aggregate,
                                normalize=settings.normalize, kinds=kinds, stats=stats, progress=False))
        _drop(model, block_names[i], aliases)
        block.to(dtype)  # on the meta device: no memory
        block_log[i].update(score_s=round(time.perf_counter() - t, 3), rss_gb_score=round(_rss_gb(), 3))
        _log(settings.log, "score", block_log[i], t_start)
        bar.set_postfix_str(f"rss {_rss_gb():.2f} GB")
        bar.update()
    times["score_s"] = sum(b["score_s"] for b in block_log)
    del carried

    # 4. plan, on the whole graph: the same call as the in-memory prune
    t = time.perf_counter()
    fraction = None if settings.ratios is not None else step_target(original, original, target, 1, 1)
    plan = Plan.from_scores(graph, scores, fraction, kinds=kinds, policy=policy, layers=layers,
                            round_to=settings.round_to, gqa=settings.gqa, ratios=settings.ratios,
                            target_of=settings.target_of)
    times["plan_s"] = time.perf_counter() - t

    # 5. write pass: per block read, mask -> probe, shrink -> probe (verify), write, drop
    rest_shards = _chunks(outside, model)
    n_shards = len(blocks) + len(rest_shards)
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map, total_size = {}, 0
    refits, sequential = [], None
    config = ReconstructConfig(mode="lstsq", damp=settings.damp, gram_dtype=settings.gram_dtype or gram_dtype_for(dtype))
    if settings.reconstruct:  # the pruned blocks' outputs feed the next block, batched as in memory
        t = time.perf_counter()
        sequential = _capture(model, ckpt, embed, aliases, blocks, batches_of(calibration, config.batch_size),
                              compute)
        times["capture_s"] += time.perf_counter() - t
    with atomic_folder(output, overwrite=settings.overwrite, sources=[folder]) as tmp:
        bar.set_description("stream: shrink, verify, write blocks")
        try:
            for i, block in enumerate(blocks):
                t = time.perf_counter()
                _put(model, ckpt.read(block_names[i]), aliases)
                block.to(compute)
                sub = _block_plan(plan, block_names[i])
                if sequential is not None and sub.entries:
                    prefix = f"{layers_path}.{i}."
                    cons = {p[len(prefix):]: idx for p, idx in consumers(model, sub).items()}
                    res = reconstruct_block(block, sequential, cons, config)
                    refits.append({"layer": i, "consumers": {prefix + p: v for p, v in res["consumers"].items()}})
                error = None
                if sub.entries:
                    error = shrink_verified(model, block, sub, probes[i], carry=sequential)
                elif sequential is not None:
                    with torch.no_grad():
                        for item in sequential:
                            item[0] = run_layer(block, item)
                block.to(dtype)  # slicing commutes with the (exact) upcast: the original values are written
                state = model.state_dict()
                tensors = {n: state[n].detach().contiguous() for n in block_names[i]}
                total_size += _save(tensors, tmp / shard(i + 1, n_shards), weight_map)
                del tensors, state
                _drop(model, block_names[i], aliases)
                gc.collect()  # the shrink's undo log and hooks sit in reference cycles: free the block's tensors now
                block_log[i].update(write_s=round(time.perf_counter() - t, 3), rss_gb_write=round(_rss_gb(), 3),
                                    verify_max_abs=error, units_removed=sum(len(e.units) for e in sub.entries))
                _log(settings.log, "write", block_log[i], t_start)
                bar.set_postfix_str(f"rss {_rss_gb():.2f} GB")
                bar.update()
        finally:
            bar.close()
        times["shrink_s"] = sum(b["write_s"] for b in block_log)
        for k, names in enumerate(rest_shards):
            total_size += _save(ckpt.read(names), tmp / shard(len(blocks) + k + 1, n_shards), weight_map)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        model.config.depgraph = records.for_save(model, config_shapes(type(model), model.config))
        model.config.save_pretrained(tmp)
        wrote_code = remote_code.write(tmp, model)  # non-uniform: modeling file + auto_map, as save_pruned does
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.endswith(_NOT_WEIGHTS):
                shutil.copy2(f, tmp / f.name)
        groups: dict = {}
        record_groups(groups, plan, scores)
        report = build_report(model, original, {
            "method": settings.method, "target": target,
            "target_of": None if settings.ratios is not None else settings.target_of, "policy": policy, "steps": 1,
            "uniform": settings.uniform, "compensate": False, "reconstruct": settings.reconstruct,
            "damp": settings.damp if settings.reconstruct else None,
            "reconstruction": refit_summary(refits) if refits else None,
            "layers": layers, "round_to": settings.round_to,
            "gqa": settings.gqa, "ratios": settings.ratios}, times, groups, graph)
        report["stream"] = {"checkpoint": str(folder), "blocks": block_log, "peak_rss_gb": round(_peak_rss_gb(), 3),
                            "wall_s": round(time.perf_counter() - t_start, 3), "dtype": str(model.dtype),
                            "compute_dtype": str(compute),
                            "gram_dtype": str(config.gram_dtype) if settings.reconstruct else None,
                            "calibration_rows": int(rows.shape[0]) if needs_stats else 0}
        (tmp / "plan.json").write_text(dump_plans(plan))
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "README.md").write_text(card.render(model.config, report, wrote_code))
    return model, report, [plan]


def _capture(model, ckpt: Checkpoint, embed: list, aliases: dict, blocks, batches, compute) -> list:
    """The first block's inputs ``[[hidden, args, kwargs], ...]`` for ``batches``: the tensors outside the blocks
    (``embed``) read, the model run up to the first block with the hidden states (and the rotary tables computed
    from them) in ``compute`` dtype, those tensors dropped again."""
    _put(model, ckpt.read(embed), aliases)
    upcast = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.to(compute))
    try:
        return capture_layer_inputs(model, blocks, batches, torch.device("cpu"))
    finally:
        upcast.remove()
        _drop(model, embed, aliases)


def _log(path, stage: str, record: dict, t_start: float) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, **record, "elapsed_s": round(time.perf_counter() - t_start, 1),
                                "peak_rss_gb": round(_peak_rss_gb(), 3)}) + "\n")


def _module_path(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _chunks(names, model) -> list:
    """``names`` split into shards of at most :data:`SHARD_BYTES` (a bigger tensor gets a shard of its own)."""
    sizes = {}
    state = model.state_dict(keep_vars=True)
    for n in names:
        sizes[n] = state[n].numel() * state[n].element_size()
    out, current, used = [], [], 0
    for n in names:
        if current and used + sizes[n] > SHARD_BYTES:
            out.append(current)
            current, used = [], 0
        current.append(n)
        used += sizes[n]
    if current:
        out.append(current)
    return out


def _block_plan(plan: Plan, names) -> Plan:
    """The entries of ``plan`` whose tensors are all in ``names`` (one block)."""
    names = set(names)
    entries = [e for e in plan.entries if set(e.removed) <= names]
    touched = {p for e in entries for p in e.removed}
    return Plan(entries, {p: s for p, s in plan.shapes.items() if p in touched})


@torch.no_grad()
def shrink_verified(model, block, plan: Plan, probe, carry=None) -> float:
    """Mask ``plan`` in ``model``, run ``block`` on ``probe`` ([hidden, args, kwargs]), shrink, run again: the two
    outputs must agree (to :data:`VERIFY_TOLERANCE` of the output's scale for the block's dtype), else
    :class:`PlanError`. Returns the max abs difference. ``carry``: captured items advanced through the masked
    block (sequential calibration, as :func:`depgraph.reconstruct.reconstruct` advances them)."""
    mask(model, plan)
    for item in carry or ():
        item[0] = run_layer(block, item)
    masked = run_layer(block, probe).float()
    shrink(model, plan)
    shrunk = run_layer(block, probe).float()
    error = float((masked - shrunk).abs().max())
    scale = float(masked.abs().max()) or 1.0
    dtype = next(block.parameters()).dtype
    if not error <= VERIFY_TOLERANCE.get(dtype, 1e-4) * scale:
        raise PlanError(f"verification failed on {plan.entries[0].group}: the shrunk block's output differs from "
                        f"the masked block's by {error:.3g} (output scale {scale:.3g}); nothing was written")
    return error


def _save(tensors: dict, path: Path, weight_map: dict) -> int:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    for n in tensors:
        weight_map[n] = path.name
    return sum(t.numel() * t.element_size() for t in tensors.values())
