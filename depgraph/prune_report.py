"""PruneReport: what :func:`depgraph.prune` returns about a run, and the one reader/writer of ``report.json``.

A dataclass with the settings, the parameter counts, the times and the per-group records; the CLI and the streamed
prune fill the optional parts (``model``, ``calibration``, ``stream``, ``evaluation``). Item access
(``report["params_after"]``, ``report.get("times")``) reads the fields too, so code written for the dict it
replaces keeps working; keys a newer (or hand-written) ``report.json`` carries beyond the fields are kept in
``extra`` and written back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET", "__bool__": lambda self: False})()
OPTIONAL = ("select", "block_method", "depth_share", "removed_blocks", "model", "calibration", "stream", "evaluation")
# written only once set (None counts as set): the in-memory prune sets the depth settings, the streamed one not


@dataclass
class PruneReport:
    """One pruning run. Settings: ``method``, ``target`` (None with ``ratios``), ``target_of`` (what the target is
    a fraction of: ``"all"`` or ``"non-embedding"`` parameters; None with ``ratios``), ``policy``, ``steps``,
    ``uniform``, ``compensate``, ``reconstruct``, ``damp``, ``reconstruction`` (per consumer: removed columns and
    relative output errors), ``layers``, ``round_to``, ``gqa``, ``ratios``, for depth pruning ``block_method``,
    ``depth_share``, ``removed_blocks``, and ``select`` (in-memory prune). Results: ``params_before``/``after``,
    ``removed_fraction`` (of all parameters), ``non_embedding_removed_fraction`` (of the parameters outside
    ``embedding``: ``{"params": names, "before": count, "after": count}``, the embedding tables and the output
    head, ``DependencyGraph.embedding_params``), ``stock_loadable``, ``times`` {phase: seconds},
    ``groups`` (per group: kind, layer, units before/after, scores, parameters removed), ``widths``
    {layer: {kind: units kept}}. Optional: ``model`` (what was pruned), ``calibration`` (its source and sizes),
    ``stream`` (the streamed run's per-block log), ``evaluation``."""

    method: str | None = None
    target: float | None = None
    target_of: str | None = None
    policy: str | None = None
    steps: int | None = None
    uniform: bool | None = None
    compensate: bool | None = None
    reconstruct: bool | None = None
    damp: float | None = None
    reconstruction: list | None = None
    layers: list | None = None
    round_to: int | None = None
    gqa: str | None = None
    ratios: dict | None = None
    block_method: Any = _UNSET
    depth_share: Any = _UNSET
    removed_blocks: Any = _UNSET
    select: Any = _UNSET
    params_before: int | None = None
    params_after: int | None = None
    removed_fraction: float | None = None
    non_embedding_removed_fraction: float | None = None
    embedding: dict | None = None
    stock_loadable: bool | None = None
    times: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)
    widths: dict = field(default_factory=dict)
    model: Any = _UNSET
    calibration: Any = _UNSET
    stream: Any = _UNSET
    evaluation: Any = _UNSET
    extra: dict = field(default_factory=dict)

    # -- dict-style access --------------------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    def __getitem__(self, key: str):
        if key in self.names():
            value = getattr(self, key)
            if value is _UNSET:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __setitem__(self, key: str, value) -> None:
        if key in self.names():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self):
        return self.to_dict().keys()

    # -- report.json -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object: every field in order (optional ones once set), then ``extra``."""
        out = {n: getattr(self, n) for n in self.names() if not (n in OPTIONAL and getattr(self, n) is _UNSET)}
        out.update(self.extra)
        return out

    def to_json(self, indent: int | None = 1) -> str:
        """The text of ``report.json``."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneReport":
        if not isinstance(data, dict):
            raise ValueError(f"a prune report is a JSON object, got {type(data).__name__}")
        names = set(cls.names())
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_json(cls, source) -> "PruneReport":
        """A report from ``report.json``'s text, a path to it, or a run folder holding one."""
        text = source if isinstance(source, str) and source.lstrip().startswith("{") else None
        if text is None:
            path = Path(source)
            text = (path / "report.json" if path.is_dir() else path).read_text()
        return cls.from_dict(json.loads(text))
