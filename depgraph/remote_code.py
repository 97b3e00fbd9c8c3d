"""Stock-transformers loading of non-uniform folders: a self-contained modeling file plus ``auto_map``.

A folder whose per-layer shapes the stock class cannot rebuild from config.json gets ``modeling_depgraph.py``
(rendered from ``templates/modeling_depgraph.py.in``; it imports only torch and transformers) and an ``auto_map``
entry, so ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with no depgraph
installed. Uniform folders are left alone: plain ``from_pretrained`` loads them.
"""
from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from string import Template

import torch

FILE = "modeling_depgraph.py"
# auto classes a remote class may be registered under, and the transformers mapping that lists their models
AUTO_CLASSES = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


def stock_loadable(model) -> bool:
    """True when ``type(model)(model.config)`` has exactly the model's tensor names and shapes (meta device)."""
    try:
        with torch.device("meta"):
            twin = type(model)(model.config)
    except Exception:  # noqa: BLE001 - a config that does not build is not stock-loadable
        return False
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return shapes == {n: tuple(t.shape) for n, t in twin.state_dict().items()}


def auto_classes(arch: str) -> list[str]:
    """The transformers auto classes whose mapping lists ``arch`` (e.g. LlamaForCausalLM -> AutoModelForCausalLM)."""
    from transformers.models.auto import modeling_auto

    found = []
    for auto, mapping in AUTO_CLASSES.items():
        names = getattr(modeling_auto, mapping, {})
        if any(arch == v or (isinstance(v, (list, tuple)) and arch in v) for v in names.values()):
            found.append(auto)
    return found


def render(arch: str, auto: str) -> str:
    """The modeling file for base class ``arch``."""
    text = resources.files("depgraph").joinpath("templates/modeling_depgraph.py.in").read_text()
    return Template(text).substitute(base=arch, cls=f"Depgraph{arch}", auto=auto)


def write(folder, model) -> bool:
    """Add the modeling file and ``auto_map`` to a saved ``folder`` unless the stock class rebuilds ``model``.

    Returns whether it wrote them; a class transformers does not ship gets none (with a warning): such a folder
    loads with ``depgraph.load_pruned``, and stock loading refuses its shapes.
    """
    if stock_loadable(model):
        return False
    import transformers

    arch = type(model).__name__
    autos = auto_classes(arch) if getattr(transformers, arch, None) is type(model) else []
    if not autos:
        warnings.warn(f"{arch} is not a transformers auto class: no stock-loadable modeling file written; "
                      f"load the folder with depgraph.load_pruned", stacklevel=3)
        return False
    folder = Path(folder)
    (folder / FILE).write_text(render(arch, autos[0]))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {auto: f"{FILE[:-3]}.Depgraph{arch}" for auto in autos}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True
