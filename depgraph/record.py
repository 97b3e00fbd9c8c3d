"""The ``config.depgraph`` record: what makes a pruned folder load with its exact shapes.

One owner: this module creates, updates, versions and reads the record; ``shrink``, ``compensate`` and ``io`` call
it instead of building the dict themselves. Fields (format 1):

* ``format``: the record's version (:data:`FORMAT`); a newer one is refused on load;
* ``modules``: ``{module path: {attribute: value}}``: module attributes ``shrink`` rewrote (``in_features``,
  ``num_heads``, ...), set again after rebuilding;
* ``layers``: ``{layer or "all": {config field: width}}``: per-layer widths after pruning (documentation);
* ``hidden_size``, ``uniform``: the pruned hidden width; whether the stock config rebuilds the same shapes;
* ``added_biases``: module paths that gained a bias (compensation), created before loading;
* ``skipped``: ``{module path: no-op spec}``: modules of removed residual sub-blocks (depth pruning), replaced by
  ``depgraph.depth.Skipped`` before loading (dropped layers need no entry: the config's layer count and the
  records are renumbered, :func:`renumber_layers`);
* ``shapes``: ``{tensor name: shape}`` of the saved state dict, checked on load;
* ``config_shapes``: ``{tensor name: shape}`` that the saved config alone builds, where it differs from ``shapes``
  (absent when the class cannot be built from the config): an edited config is caught on load.
"""
from __future__ import annotations

from .errors import LoadError

FORMAT = 1
KEY = "depgraph"


def _holder(model):
    config = getattr(model, "config", None)
    return config if config is not None else model


def new() -> dict:
    """An empty record of the current format."""
    return {"format": FORMAT, "modules": {}, "layers": {}}


def get(model, create: bool = True) -> dict | None:
    """The record on ``model.config`` (on the model when it has no config); created when missing and ``create``."""
    holder = _holder(model)
    info = getattr(holder, KEY, None)
    if isinstance(info, dict):
        return info
    if not create:
        return None
    info = new()
    setattr(holder, KEY, info)
    return info


def set_module_attrs(record: dict, path: str, values: dict) -> None:
    """Remember module attributes that ``shrink`` set (tuples stored as lists, as JSON keeps them)."""
    for k, v in values.items():
        record["modules"].setdefault(path, {})[k] = list(v) if isinstance(v, tuple) else v


def add_biases(record: dict, paths) -> None:
    """Remember module paths that gained a bias (sorted, without repeats)."""
    record["added_biases"] = sorted(set(record.get("added_biases", [])) | set(paths))


def for_save(model, built: dict | None = None) -> dict:
    """The record to write with ``model``: the current one (or a new one) plus the state dict's shapes, and
    where ``built`` (``{tensor name: shape}`` the config alone builds) differs from them, ``config_shapes``."""
    info = dict(get(model, create=False) or new())
    info["shapes"] = {n: list(p.shape) for n, p in model.state_dict().items()}
    info.pop("config_shapes", None)
    if built is not None:
        info["config_shapes"] = {n: s for n, s in built.items() if info["shapes"].get(n) != s}
    return info


def read(raw_config: dict, where: str = "config.json") -> dict:
    """The record of a saved ``config.json`` (a dict), with defaults for every field; {} -> an empty record."""
    info = raw_config.get(KEY) or {}
    if not isinstance(info, dict):
        raise LoadError(f"{where}: the {KEY!r} record is a {type(info).__name__}, not an object")
    fmt = info.get("format", FORMAT)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise LoadError(f"{where}: {KEY} record format {fmt!r} is newer than this depgraph reads ({FORMAT}); "
                        f"upgrade depgraph")
    return {"format": fmt, "modules": {}, "layers": {}, "added_biases": [], "shapes": {}, "skipped": {}, **info}


def add_skipped(record: dict, specs: dict) -> None:
    """Remember the no-op specs of skipped sub-block modules ({module path: spec})."""
    record.setdefault("skipped", {}).update(specs)


def renumber_layers(record: dict, rename, gone) -> None:
    """The record after layers ``gone`` (indices) were removed: ``modules``/``skipped`` paths through ``rename``
    (None drops a path inside a removed layer), ``layers`` keys shifted down."""
    for key in ("modules", "skipped"):
        old = record.get(key) or {}
        record[key] = {rename(p): v for p, v in old.items() if rename(p) is not None}
    gone = set(gone)
    out = {}
    for k, v in (record.get("layers") or {}).items():
        if not k.isdigit():
            out[k] = v
        elif int(k) not in gone:
            out[str(int(k) - sum(g < int(k) for g in gone))] = v
    record["layers"] = out
