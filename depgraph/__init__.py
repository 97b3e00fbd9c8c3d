"""depgraph: structured pruning of Hugging Face models through an exact dependency graph."""
from .errors import DepgraphError, LoadError, OutputError, PlanError, TraceError, UnsupportedOpError
from .graph import DependencyGraph, trace
from .groups import Group, Member

__all__ = ["trace", "DependencyGraph", "Group", "Member", "DepgraphError", "TraceError", "PlanError",
           "LoadError", "OutputError", "UnsupportedOpError"]
from .io import load_pruned, save_pruned
from .plan import Plan
from .shrink import mask, shrink

__all__ += ["Plan", "mask", "shrink", "save_pruned", "load_pruned"]
from .importance import score

__all__ += ["score"]
from .prune import prune
from .prune_report import PruneReport

__all__ += ["prune", "PruneReport"]
from .sparsify import SparsifyError, sparsify, to_semi_structured

__all__ += ["sparsify", "SparsifyError", "to_semi_structured"]
