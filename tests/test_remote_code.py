"""Non-uniform folders load with stock transformers (trust_remote_code) where depgraph cannot be imported."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig

import depgraph
from archs import ARCHS, ids
from depgraph import remote_code

GEN_TOKENS = 6

# Runs in a fresh interpreter, cwd outside the repository, with depgraph made unimportable.
CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["depgraph"] = None
    try:
        import depgraph
    except ImportError:
        pass
    else:
        raise SystemExit("depgraph imported")
    import torch, transformers
    out = {}
    for name, folder in json.load(open("folders.json")).items():
        cfg = json.load(open(folder + "/config.json"))
        auto = next(iter(cfg["auto_map"])) if "auto_map" in cfg else "AutoModelForCausalLM"
        model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        x = torch.load(folder + "/../ids.pt")
        with torch.no_grad():
            res = {"class": type(model).__name__, "logits": model(x).logits}
            if hasattr(model, "generate") and auto == "AutoModelForCausalLM":
                res["generated"] = model.generate(x[:1], max_new_tokens=%d, do_sample=False, min_new_tokens=%d,
                                                  pad_token_id=0)
        out[name] = res
    torch.save(out, "results.pt")
""" % (GEN_TOKENS, GEN_TOKENS))


def _non_uniform_plan(graph, kinds=("attention", "mlp")):
    """Layer 0 loses one query head per kv group and three neurons; layer 1 keeps its shape."""
    removals = {}
    for g in graph.groups(kinds):
        if g.layer not in (0, None):
            continue
        if g.kind == "attention":
            kv, rep = g.gqa if g.gqa else (g.num_units, 1)
            removals[g.id] = [rep * k for k in range(kv)] if g.gqa else [0]
        elif g.kind == "mlp":
            removals[g.id] = [1, 5, 9]
        elif g.kind == "hidden":
            removals[g.id] = [2, 7, 11, 30]
    return depgraph.Plan.from_units(graph, removals)


def _shrunk(arch, kinds=("attention", "mlp")):
    model = ARCHS[arch]()
    return depgraph.shrink(copy.deepcopy(model), _non_uniform_plan(depgraph.trace(model), kinds))


def _dropped_first_layer():
    """A llama with its first decoder layer removed, recorded as removed_layers; the record names what stays
    by its new index (layer 1 -> 0), as the state dict does."""
    model = _shrunk("llama-gqa")
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[1:])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    record = model.config.depgraph
    record["modules"] = {k.replace("model.layers.1.", "model.layers.0."): v for k, v in record["modules"].items()
                         if not k.startswith("model.layers.0.")}
    record["removed_layers"] = {"model.layers": [0]}
    return model


def _depth_pruned():
    """A 3-layer llama with layer 1 dropped, the new layer 1's attention sub-block skipped and layer 0 narrowed."""
    import transformers as tf
    from archs import COMMON

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 3}, num_attention_heads=6, num_key_value_heads=2)
    cfg.use_cache = False
    model = tf.LlamaForCausalLM(cfg).eval()
    plan = depgraph.Plan.from_units(depgraph.trace(model), {"block.1": [0], "block.2.attention": [0],
                                                            "mlp.0": [1, 5, 9]})
    return depgraph.shrink(model, plan)


CASES = {arch: (lambda a=arch: _shrunk(a)) for arch in ARCHS}
CASES["llama-depth"] = _depth_pruned
CASES["llama-gqa+hidden"] = lambda: _shrunk("llama-gqa", ("attention", "mlp", "hidden"))
CASES["llama-gqa-dropped-layer"] = _dropped_first_layer


@pytest.fixture(scope="module")
def stock_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    x = ids()
    torch.save(x, root / "ids.pt")
    expected, folders = {}, {}
    for name, build in CASES.items():
        model = build()
        assert model.config.depgraph.get("uniform") is not True
        folder = root / name
        depgraph.save_pruned(model, folder)
        with torch.no_grad():
            exp = {"logits": model(x).logits}
            if model.can_generate():
                exp["generated"] = model.generate(x[:1], max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                                                  do_sample=False, pad_token_id=0)
        expected[name], folders[name] = exp, str(folder)
    (root / "folders.json").write_text(json.dumps(folders))
    (root / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "child.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return expected, torch.load(root / "results.pt"), folders


@pytest.mark.parametrize("name", list(CASES))
def test_stock_transformers_loads_non_uniform_folder(name, stock_results):
    expected, got, folders = stock_results
    assert got[name]["class"].startswith("Depgraph")
    assert torch.equal(got[name]["logits"], expected[name]["logits"])
    if "generated" in expected[name]:
        assert torch.equal(got[name]["generated"], expected[name]["generated"])
        assert got[name]["generated"].shape[1] == ids().shape[1] + GEN_TOKENS
    if "removed_layers" not in json.loads(open(folders[name] + "/config.json").read())["depgraph"]:
        loaded = depgraph.load_pruned(folders[name])  # depgraph's own loader still reads the folder
        assert torch.equal(loaded(ids()).logits, expected[name]["logits"])


def test_uniform_folder_gets_no_modeling_file(tmp_path):
    model = ARCHS["llama-gqa"]()
    graph = depgraph.trace(model)
    plan = depgraph.Plan.from_units(graph, {g.id: list(range(0, 64, 4)) for g in graph.groups(("mlp",))})
    shrunk = depgraph.shrink(model, plan)
    depgraph.save_pruned(shrunk, tmp_path / "m")
    assert not (tmp_path / "m" / remote_code.FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_modeling_file_imports_only_torch_and_transformers(tmp_path):
    depgraph.save_pruned(_shrunk("gpt2"), tmp_path / "m")
    text = (tmp_path / "m" / remote_code.FILE).read_text()
    imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"torch", "transformers"}
    cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert cfg.auto_map == {"AutoModelForCausalLM": "modeling_depgraph.DepgraphGPT2LMHeadModel"}


def test_without_trust_remote_code_stock_refuses_rather_than_misloads(tmp_path):
    from transformers import AutoModelForCausalLM

    depgraph.save_pruned(_shrunk("llama-gqa"), tmp_path / "m")
    with pytest.raises(Exception, match="(?i)mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
