"""The architecture sweep: every causal LM the installed transformers ships, tiny and random, traced and checked.

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random model from its config class (2 layers,
hidden 64, 4 heads / 2 kv heads, small vocabulary and MLP; a composite multimodal config gives its text config and
text model), run one plain forward (a model that cannot is *not buildable* and leaves the denominator), trace it,
and grade it:

- **PASS**: an attention group in every layer that runs softmax attention, an MLP group in every layer with a
  feed-forward or MoE block, an experts group in every MoE layer, and removal == masking (fp32, 1e-5) for every
  exact kind under random plans (both GQA policies); inexact groups (the residual stream) shrink to a model that runs.
- **PARTIAL**: what it prunes is exact, but a kind is missing in some layer (the reason says which op blocked it).
- **WRONG**: a shrunk model differs from its mask, or fails to run, or shrink raises.
- **FAIL**: trace raises (``cause``: ``export`` when torch.export itself fails on the model, ``depgraph`` otherwise,
  ``timeout`` when the architecture ran out of time).

What a layer *runs* is decided by forward hooks and a torch-function mode during the plain forward, never by
depgraph's answer: a layer runs softmax attention when a ``scaled_dot_product_attention``/``flex_attention`` call,
or a softmax over a ``[..., T, S]`` score tensor with ``T`` the sequence length, happens inside it; it has a
feed-forward block when a sub-module named or typed like one (``mlp``, ``ffn``, ``feed_forward``, ``moe``, ...)
runs in it; the block is MoE when that sub-module holds 3-D expert weights (every dim above 1) or an ``experts`` module list. These
name tables live here, in the benchmark, never in depgraph's core.

Usage: ``PYTHONPATH=$PWD python bench/coverage.py [--only llama,mixtral] [--out DIR] [--jobs 2] [--timeout 60]``
writes ``coverage.json`` and ``coverage.md`` (default ``bench/results/``). :func:`sweep` is the importable entry
point used by ``tests/test_sweep.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEQ = 8
VOCAB = 128
ATOL = 1e-5

# config fields set to tiny values when the config class has them (aliases resolve through attribute_map)
TINY = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embedding_dim": 64, "embed_dim": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "num_query_groups": 2,
    "head_dim": 16, "d_head": 16, "dim_head": 16, "attention_head_size": 16, "kv_channels": 16,
    "attention_head_dim": 16,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "d_inner": 128, "ffn_hidden_size": 128,
    "dff": 128, "dim_ff": 128, "feed_forward_size": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64,
    "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "num_blocks": 2, "decoder_layers": 2,
    "encoder_layers": 2,
    "vocab_size": VOCAB,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "n_shared_experts": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16,
    "max_position_embeddings": 128, "n_positions": 128, "max_seq_len": 128, "context_length": 128,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8, "mamba_dt_rank": 8,
    "mamba_num_heads": 8, "mamba_head_dim": 16, "n_mamba_heads": 8, "mamba_headdim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "attention_hidden_size": 64, "num_nextn_predict_layers": 0,
    "sliding_window": 6,
}
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id")

# harness-side names of feed-forward blocks (the core never names a module)
_FFN = re.compile(r"(^|[._])(mlp|ffn|feed_?forward|moe|block_sparse_moe|ff|fc_block|channel_mix|"
                  r"feedforward|experts?|sparse_moe|mixer_mlp)($|[._])", re.I)
_FFN_CLASS = re.compile(r"(MLP|FeedForward|FFN|Moe|MoE|Expert|SwiGLU|GatedMlp|FeedForward)", re.I)


@dataclass
class Row:
    """One architecture's verdict."""

    name: str
    cls: str
    verdict: str = "FAIL"  # PASS / PARTIAL / WRONG / FAIL / NOT_BUILDABLE
    reason: str = ""
    cause: str = ""  # FAIL: export / depgraph / timeout
    expected: dict = field(default_factory=dict)  # kind -> layers that run it
    found: dict = field(default_factory=dict)  # kind -> layers with a group of that kind
    missing: dict = field(default_factory=dict)  # "kind@layer" -> why (blocked reasons, unsupported ops)
    checked: list = field(default_factory=list)  # removal == masking checks that ran
    seconds: float = 0.0


# -- building ------------------------------------------------------------------------------------------
def _per_layer_lists(defaults: dict, n_default: int) -> dict:
    """Per-layer list fields shrunk to one layer of each distinct kind (at least 2 layers)."""
    out = {}
    for k, v in defaults.items():
        if isinstance(v, list) and n_default and len(v) == n_default and v and all(isinstance(x, str) for x in v):
            kinds = list(dict.fromkeys(v))
            # put a full-attention layer last so hybrid models still run softmax attention in a 2-layer model
            picked = kinds if len(kinds) >= 2 else kinds * 2
            out[k] = picked
    return out


def tiny_config(model_type: str):
    """The tiny random config for ``model_type`` (composite configs: their text config)."""
    from transformers import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    base = cfg_cls()
    text = getattr(base, "text_config", None) if "text_config" in (getattr(cfg_cls, "sub_configs", None) or {}) \
        else None
    return _shrunk(type(text) if text is not None else cfg_cls), text is not None


def _shrunk(cfg_cls):
    defaults = cfg_cls().to_dict()
    n_default = next((defaults[f] for f in LAYER_COUNT_FIELDS if isinstance(defaults.get(f), int)), 0)
    kw = {k: v for k, v in TINY.items() if k in defaults}
    if "qk_rope_head_dim" in defaults:  # MLA: head_dim is the rotary part
        kw["head_dim"] = kw["qk_rope_head_dim"]
    if "kv_lora_rank" in defaults and "num_key_value_heads" in kw:  # MLA: kv_b_proj makes a key per query head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    lists = _per_layer_lists(defaults, n_default)
    kw.update(lists)
    if lists:
        n = len(next(iter(lists.values())))
        for f in LAYER_COUNT_FIELDS:
            if f in defaults:
                kw[f] = n
    for f in TOKEN_FIELDS:
        v = defaults.get(f)
        if isinstance(v, int) and v >= VOCAB:
            kw[f] = 1
        elif isinstance(v, list):
            kw[f] = [x if x < VOCAB else 1 for x in v if isinstance(x, int)] or None
    for k in list(kw):
        if kw[k] is None:
            kw.pop(k)
    try:
        cfg = cfg_cls(**kw)
    except Exception:  # noqa: BLE001 - some configs validate combinations; fall back to setting fields after
        cfg = cfg_cls()
        for k, v in kw.items():
            try:
                setattr(cfg, k, v)
            except Exception:  # noqa: BLE001
                pass
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def build(name: str, cls_name: str):
    """(model, config) of a tiny random ``name`` model in fp32 eval mode."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg, is_text = tiny_config(name)
    model_cls = getattr(transformers, cls_name)
    if is_text:  # composite config: the causal LM of its text config
        text_cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type)
        if text_cls and hasattr(transformers, text_cls):
            model_cls = getattr(transformers, text_cls)
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - eager-only models stay eager
        pass
    return model


def probe_ids(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, SEQ), generator=g)


def logits(model, x):
    import torch

    with torch.no_grad():
        out = model(x)
    out = out.logits if hasattr(out, "logits") else out[0]
    return out.float()


# -- ground truth: what runs in each layer ---------------------------------------------------------------
def decoder_layers(model) -> dict:
    """{layer index: module path} of the shallowest ModuleList of layers (ground truth by structure)."""
    import torch

    best = None
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) >= 1 and \
                any(p.dim() >= 2 for p in mod.parameters()):
            depth = path.count(".")
            if best is None or depth < best[0] or (depth == best[0] and len(mod) > len(best[2])):
                best = (depth, path, mod)
    if best is None:
        return {}
    return {i: f"{best[1]}.{i}" for i in range(len(best[2]))}


def observe(model, x) -> tuple:
    """({layer: {"attention": [module paths], "mlp": [paths], "moe": [paths]}}, logits) from one plain forward."""
    import torch
    from torch.overrides import TorchFunctionMode

    layers = decoder_layers(model)
    stack: list = []
    ran: set = set()
    attention_calls: list = []
    handles = []

    def pre(path):
        def hook(mod, args):
            stack.append(path)
            ran.add(path)
        return hook

    def post(path):
        def hook(mod, args, out):
            if stack and stack[-1] == path:
                stack.pop()
        return hook

    for path, mod in model.named_modules():
        if path:
            handles.append(mod.register_forward_pre_hook(pre(path)))
            handles.append(mod.register_forward_hook(post(path)))

    F = torch.nn.functional
    sdpa_like = {F.scaled_dot_product_attention}
    try:
        from torch.nn.attention.flex_attention import flex_attention
        sdpa_like.add(flex_attention)
    except ImportError:
        pass
    softmaxes = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.Tensor.log_softmax}

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in sdpa_like:
                attention_calls.append(list(stack))
            elif func in softmaxes and args and isinstance(args[0], torch.Tensor):
                t = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
                if t.dim() >= 3 and isinstance(dim, int) and dim % t.dim() == t.dim() - 1 and t.shape[-2] == SEQ:
                    attention_calls.append(list(stack))
            return func(*args, **kwargs)

    try:
        with Mode():
            dense = logits(model, x)
    finally:
        for h in handles:
            h.remove()

    out = {}
    for i, lpath in layers.items():
        info = {"attention": [], "mlp": [], "moe": []}
        prefix = lpath + "."
        for st in attention_calls:
            inside = [p for p in st if p.startswith(prefix)]
            if inside:
                info["attention"].append(inside[0])
        ffn = sorted(p for p in ran if p.startswith(prefix) and _is_ffn(model, p, prefix))
        ffn = [p for p in ffn if not any(p.startswith(q + ".") for q in ffn if q != p)]  # outermost only
        ffn = [p for p in ffn if not any(a.startswith(p + ".") or a == p for a in info["attention"])]
        info["mlp"] = ffn
        info["moe"] = [p for p in ffn if _is_moe(model.get_submodule(p))]
        info["attention"] = sorted(set(info["attention"]))
        out[i] = info
    return out, dense


def _is_ffn(model, path, prefix) -> bool:
    rel = path[len(prefix):]
    mod = model.get_submodule(path)
    if not any(p.dim() >= 2 for p in mod.parameters()):
        return False
    leaf = rel.rsplit(".", 1)[-1]
    return bool(_FFN.search(leaf) or _FFN_CLASS.search(type(mod).__name__))


def _is_moe(mod) -> bool:
    import torch

    # a 3-D bank of experts [E, a, b]; a [1, 1, H] mixing vector (RWKV's time_mix_*) or a depthwise conv's
    # [C, 1, k] weight is not one
    if any(p.dim() == 3 and min(p.shape) > 1 for p in mod.parameters()):
        return True
    return any(isinstance(m, torch.nn.ModuleList) and re.search(r"experts?$", n or "", re.I)
               for n, m in mod.named_modules())


# -- grading ---------------------------------------------------------------------------------------------
def _why_missing(graph, module: str) -> str:
    """The first blocked reason or unsupported op under ``module``."""
    for n in graph.unsupported:
        if n.module.startswith(module):
            return f"no rule: {n}"
    for b in graph.blocked:
        if any(p.startswith(module + ".") for p in b["params"]):
            return b["reasons"][0]
    for n in graph.notes:
        if n.module.startswith(module):
            return str(n)
    return "no group found (no blocked space under the module either)"


def _shrink(model, plan):
    import inspect

    import depgraph

    kw = {"verify": False} if "verify" in inspect.signature(depgraph.shrink).parameters else {}
    return depgraph.shrink(model, plan, **kw)


def _check(model, graph, kinds, gqa, x, ref_dense, exact: bool) -> str | None:
    """None if shrink matches mask (exact kinds) or runs (inexact); else why not."""
    import torch

    import depgraph

    plan = depgraph.Plan.random(graph, 0.5, seed=0, kinds=kinds, gqa=gqa)
    plan = depgraph.Plan([e for e in plan.entries if e.exact == exact], plan.shapes)
    if not plan.entries or plan.params_removed() == 0:
        return None
    label = "+".join(kinds) + (f"/{gqa}" if "attention" in kinds else "")
    masked = logits(depgraph.mask(copy.deepcopy(model), plan), x) if exact else None
    try:
        shrunk_model = _shrink(copy.deepcopy(model), plan)
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001
        return f"{label}: shrink raised {type(e).__name__}: {_first_line(e)}"
    try:
        shrunk = logits(shrunk_model, x)
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001
        return f"{label}: shrunk model fails: {type(e).__name__}: {_first_line(e)}"
    if not exact:
        return None if shrunk.shape == ref_dense.shape and torch.isfinite(shrunk).all() else \
            f"{label}: shrunk model gives shape {tuple(shrunk.shape)} or non-finite logits"
    if shrunk.shape != masked.shape:
        return f"{label}: shrunk logits {tuple(shrunk.shape)} vs masked {tuple(masked.shape)}"
    err = (shrunk - masked).abs().max().item()
    if not err <= ATOL * max(1.0, masked.abs().max().item()):
        worst = _first_differing(model, graph, plan, x)
        return f"{label}: removal != masking (max |diff| {err:.2e}){worst}"
    return None


def _first_differing(model, graph, plan, x) -> str:
    """Which single group of the plan breaks removal == masking (for the reason text)."""
    import depgraph

    for e in plan.entries:
        one = depgraph.Plan([e], plan.shapes)
        try:
            a = logits(depgraph.mask(copy.deepcopy(model), one), x)
            b = logits(_shrink(copy.deepcopy(model), one), x)
        except Exception as err:  # noqa: BLE001
            return f"; group {e.group}: {type(err).__name__}"
        if a.shape != b.shape or (a - b).abs().max().item() > ATOL * max(1.0, a.abs().max().item()):
            return f"; first group that differs: {e.group}"
    return ""


def _first_line(e) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:200]


def grade(name: str, cls_name: str) -> Row:
    """Build, observe, trace and check one architecture."""
    import torch

    import depgraph
    from depgraph.errors import TraceError

    row = Row(name, cls_name)
    t0 = time.perf_counter()
    try:
        try:
            model = build(name, cls_name)
            row.cls = type(model).__name__
            x = probe_ids()
            observed, dense = observe(model, x)
            if not torch.isfinite(dense).all():
                raise ValueError("non-finite logits")
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001
            row.verdict, row.reason = "NOT_BUILDABLE", f"{type(e).__name__}: {_first_line(e)}"
            return row
        row.expected = {
            "attention": [i for i, v in observed.items() if v["attention"]],
            "mlp": [i for i, v in observed.items() if v["mlp"]],
            "experts": [i for i, v in observed.items() if v["moe"]],
        }
        try:
            graph = depgraph.trace(model)
        except TraceError as e:
            if isinstance(e.__cause__, TimeoutError):
                raise e.__cause__
            cause = "export" if "torch.export failed" in str(e) else "depgraph"
            row.verdict, row.cause, row.reason = "FAIL", cause, _first_line(e)
            return row
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001
            tb = traceback.extract_tb(e.__traceback__)[-1]
            row.verdict, row.cause = "FAIL", "depgraph"
            row.reason = f"{type(e).__name__}: {_first_line(e)} ({Path(tb.filename).name}:{tb.lineno})"
            return row
        row.found = {k: sorted({g.layer for g in graph.groups(k) if g.layer is not None})
                     for k in ("attention", "mlp", "experts")}
        for kind, layers in row.expected.items():
            for i in layers:
                if i not in row.found[kind]:
                    key = "moe" if kind == "experts" else kind
                    mods = observed[i][key]
                    row.missing[f"{kind}@{i}"] = "; ".join(f"{m}: {_why_missing(graph, m)}" for m in mods[:1])

        problems = []
        exact_kinds = tuple(sorted({g.kind for g in graph.groups() if g.exact}))
        runs = [(exact_kinds, "heads")] if exact_kinds else []  # every exact kind at once, GQA: heads per kv
        if any(g.gqa for g in graph.groups("attention") if g.exact):
            runs.append((("attention",), "kv"))  # and whole kv groups
        for kinds, gqa in runs:
            why = _check(model, graph, kinds, gqa, x, dense, exact=True)
            row.checked.append("+".join(kinds) + (f"/{gqa}" if "attention" in kinds else ""))
            if why:
                problems.append(why)
        inexact_kinds = tuple(sorted({g.kind for g in graph.groups() if not g.exact}))
        if inexact_kinds:
            why = _check(model, graph, inexact_kinds, "heads", x, dense, exact=False)
            row.checked.append("+".join(inexact_kinds) + " (inexact: runs)")
            if why:
                problems.append(why)
        if problems:
            row.verdict, row.reason = "WRONG", " | ".join(problems)
        elif row.missing:
            row.verdict = "PARTIAL"
            row.reason = " | ".join(f"{k}: {v}" for k, v in list(row.missing.items())[:3])
        else:
            row.verdict = "PASS"
        return row
    except TimeoutError as e:
        row.verdict, row.cause, row.reason = "FAIL", "timeout", str(e)
        return row
    finally:
        row.seconds = round(time.perf_counter() - t0, 2)


def _alarm(signum, frame):
    raise TimeoutError("timed out")


def _grade_timed(args) -> dict:
    name, cls_name, timeout = args
    import torch

    torch.set_num_threads(1)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout))
    try:
        row = grade(name, cls_name)
        if row.cause == "timeout":
            row.reason = f"timed out after {timeout} s"
    except Exception as e:  # noqa: BLE001 - the sweep itself must not die on one architecture
        row = Row(name, cls_name, "FAIL", f"sweep error {type(e).__name__}: {_first_line(e)}", "depgraph")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return asdict(row)


# -- the sweep -------------------------------------------------------------------------------------------
def architectures(only=None) -> dict:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if only:
        unknown = [n for n in only if n not in archs]
        if unknown:
            raise SystemExit(f"coverage: unknown architecture(s) {', '.join(unknown)}")
        archs = {n: archs[n] for n in only}
    return archs


def totals(rows: list) -> dict:
    counts = {v: 0 for v in ("PASS", "PARTIAL", "WRONG", "FAIL", "NOT_BUILDABLE")}
    for r in rows:
        counts[r["verdict"]] += 1
    buildable = len(rows) - counts["NOT_BUILDABLE"]
    causes = {c: sum(1 for r in rows if r["verdict"] == "FAIL" and r["cause"] == c)
              for c in ("depgraph", "export", "timeout")}
    return {**counts, "buildable": buildable, "FAIL_depgraph": causes["depgraph"],
            "FAIL_export": causes["export"], "FAIL_timeout": causes["timeout"],
            "pass_rate": round(counts["PASS"] / buildable, 3) if buildable else 0.0}


def sweep(only=None, jobs: int = 2, timeout: float = 60, progress: bool = False) -> dict:
    """Grade every architecture; returns {"rows": [...], "totals": {...}, "seconds", "transformers"}."""
    import transformers

    t0 = time.perf_counter()
    archs = architectures(only)
    tasks = [(n, c, timeout) for n, c in archs.items()]
    rows = []
    if jobs <= 1:
        it = map(_grade_timed, tasks)
        for r in it:
            rows.append(r)
            if progress:
                print(f"{r['name']:<28} {r['verdict']:<14} {r['seconds']:>6}s {r['reason'][:150]}", flush=True)
    else:
        import multiprocessing

        import depgraph  # noqa: F401 - imported once here, so forked workers start warm
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for r in pool.map(_grade_timed, tasks):
                rows.append(r)
                if progress:
                    print(f"{r['name']:<28} {r['verdict']:<14} {r['seconds']:>6}s {r['reason'][:150]}", flush=True)
    return {"transformers": transformers.__version__, "seconds": round(time.perf_counter() - t0, 1),
            "jobs": jobs, "timeout_s": timeout, "totals": totals(rows), "rows": rows}


def merged(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s rows replacing the same architectures (totals recomputed, re-graded names listed)."""
    if old["transformers"] != new["transformers"]:
        raise SystemExit(f"coverage: --update across transformers versions ({old['transformers']} vs "
                         f"{new['transformers']}); run the whole sweep")
    by_name = {r["name"]: r for r in old["rows"]}
    by_name.update({r["name"]: r for r in new["rows"]})
    rows = [by_name[n] for n in sorted(by_name)]
    regraded = sorted(set(old.get("regraded", [])) | {r["name"] for r in new["rows"]})
    updates = old.get("updates", []) + [{"rows": len(new["rows"]), "seconds": new["seconds"], "jobs": new["jobs"],
                                         "timeout_s": new["timeout_s"]}]
    return {**old, "rows": rows, "totals": totals(rows), "regraded": regraded, "updates": updates}


def markdown(result: dict) -> str:
    t = result["totals"]
    lines = [
        "# Architecture coverage", "",
        f"Every causal LM in transformers {result['transformers']} (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), as a tiny "
        "random model: 2 layers, hidden 64, 4 heads / 2 kv heads, vocabulary 128, MLP 128 (MoE: 4 experts, top-2, "
        "expert MLP 32); composite configs give their text model. Protocol: one plain forward on ids [2, 8] "
        "(fails: not buildable); `depgraph.trace`; what each layer runs is read from forward hooks; for every exact "
        "kind a random 50% plan (all exact kinds together, GQA: the same query heads per kv group; then whole kv "
        "groups), masked vs shrunk logits in fp32 within 1e-5 (times max(1, max |logit|)); "
        "inexact groups (hidden) must shrink to a model that runs. Generated by `bench/coverage.py`.", "",
        f"**{t['PASS']} PASS, {t['PARTIAL']} PARTIAL, {t['WRONG']} WRONG, {t['FAIL']} FAIL** "
        f"({t['FAIL_depgraph']} in depgraph, {t['FAIL_export']} in torch.export, {t['FAIL_timeout']} timed out) "
        f"of {t['buildable']} buildable "
        f"({t['NOT_BUILDABLE']} not buildable); PASS rate {t['pass_rate']:.1%}. "
        f"Sweep time {result['seconds']} s with {result['jobs']} process(es) on a shared 2-core CPU machine "
        f"(time box {result['timeout_s']} s per architecture)."
        + (f" Re-graded after the sweep (`--update`): {', '.join(result['regraded'])}." if result.get("regraded")
           else "")
        + "".join(f" Re-grade run: {u['rows']} rows in {u['seconds']} s, {u['jobs']} process(es), time box "
                  f"{u['timeout_s']} s." for u in result.get("updates", ())), "",
        "| architecture | class | verdict | reason |", "|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: r["name"]):
        verdict = r["verdict"] + (f" ({r['cause']})" if r["cause"] else "")
        reason = r["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['name']} | {r['cls']} | {verdict} | {reason} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    """Write coverage.json and coverage.md into ``out`` (each via a temporary file renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in (("coverage.json", json.dumps(result, indent=1) + "\n"), ("coverage.md", markdown(result))):
        tmp = out / f".{fname}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / fname)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types (keys of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for coverage.json / coverage.md")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (at most 2 on this machine)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per architecture")
    ap.add_argument("--update", action="store_true",
                    help="re-grade only the --only architectures and replace their rows in OUT/coverage.json")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    result = sweep(only, jobs=args.jobs, timeout=args.timeout, progress=True)
    if args.update:
        result = merged(json.loads((args.out / "coverage.json").read_text()), result)
    write(result, args.out)
    t = result["totals"]
    print(f"{t} in {result['seconds']} s -> {args.out / 'coverage.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
