"""Exit 0 when this environment lacks what `make test` / `make demo` need (so the Makefile installs it), else 1.

Standard library only: it runs before anything is installed.
"""
import importlib.metadata
import importlib.util
import sys

MODULES = ("torch", "transformers", "pytest", "pytest_timeout", "networkx", "safetensors", "gguf", "accelerate",
           "peft", "lm_eval", "torch_pruning", "matplotlib")

missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
try:
    importlib.metadata.version("depgraph")
except importlib.metadata.PackageNotFoundError:
    missing.append("depgraph (the project itself)")
if missing:
    print(f"first use: installing the pinned torch and the project (missing: {', '.join(missing)})")
sys.exit(0 if missing else 1)
