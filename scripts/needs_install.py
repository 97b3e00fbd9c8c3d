"""Exit 0 when this environment lacks what `make test` / `make demo` need (so the Makefile installs it), else 1.

Standard library only: it runs before anything is installed.
"""
import importlib.metadata
import importlib.util
import sys

MODULES = ("torch", "transformers", "pytest", "pytest_timeout", "networkx", "safetensors", "gguf", "accelerate",
           "peft", "lm_eval", "torch_pruning", "matplotlib")

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # this checkout

missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
try:
    importlib.metadata.version("depgraph")
    spec = importlib.util.find_spec("depgraph")  # sys.path[0] is scripts/, so this is the installed copy
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is None or not origin.is_relative_to(ROOT):
        missing.append(f"depgraph from this checkout (installed: {origin.parent if origin else 'nothing importable'})")
except importlib.metadata.PackageNotFoundError:
    missing.append("depgraph (the project itself)")
if missing:
    print(f"first use: installing the pinned torch and the project (missing: {', '.join(missing)})")
sys.exit(0 if missing else 1)
