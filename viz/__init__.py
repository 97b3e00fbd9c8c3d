"""viz: see the dependency graph and the pruning.

* :func:`draw` -- Graphviz drawings of a :class:`depgraph.DependencyGraph` (overview or one layer / group), with a
  :class:`depgraph.Plan`'s removed counts on top.
* :func:`report` -- one self-contained HTML file describing a pruning run folder.
"""
from .draw import draw, save
from .report import report

__all__ = ["draw", "save", "report"]
