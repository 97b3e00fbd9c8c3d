"""Output folders: one mechanism for every folder depgraph writes (pruned models, sparsified models, runs).

* :func:`check_output` refuses, before any work, an OUT that would lose data: an existing file, the source model
  itself (or a folder inside it, or one holding it), a non-empty folder that is not a depgraph output folder (unless
  ``overwrite``), an unwritable parent.
* :func:`output_folder` is a context manager yielding a temporary sibling ``.OUT.depgraph-tmp-PID-XXXX`` to write
  into; on success it is marked, given the usual permissions and renamed into place (an existing OUT is replaced
  only then); on any exception, or a kill, OUT is untouched. The owner's pid is in the temporary's name, so the next
  write to the same place removes temporaries of dead processes, and puts back an OUT whose replacement was killed
  between the two renames.

A depgraph output folder carries the marker file :data:`MARKER` (or, written before the marker existed, a
``config.json`` with a ``"depgraph"`` record).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from . import record as records
from .errors import OutputError

MARKER = ".depgraph-output"
_TMP = re.compile(r"^\.(?P<name>.+)\.depgraph-(?P<role>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def is_output_folder(path) -> bool:
    """True when ``path`` is a folder depgraph wrote (the marker, or a config.json with a depgraph record)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and records.KEY in data


def mark(folder, kind: str, **fields) -> None:
    """Write the marker that makes ``folder`` a depgraph output folder; ``model="model"`` says that a run folder's
    model lives in that subfolder (so every MODEL argument accepts the run folder)."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind, "format": 1, **fields}) + "\n")


def model_subfolder(path) -> Path | None:
    """The model folder a marked run folder names (``recover``'s OUT/model), or None."""
    try:
        data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sub = data.get("model") if isinstance(data, dict) else None
    return Path(path) / sub if isinstance(sub, str) and sub else None


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies below it (both resolved)."""
    return a == b or b in a.parents


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing ancestor of ``path``; raises unless it is a writable folder."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot create it, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write there, {parent} is not writable")
    return parent


def check_output(path, overwrite: bool = False, sources=()) -> Path:
    """Raise :class:`OutputError` (one line naming OUT) unless writing ``path`` is safe; returns it resolved.

    ``sources``: paths the run reads (the model folder or file); OUT may be none of them, lie inside one, or hold one,
    whatever ``overwrite`` says.
    """
    given = Path(path).expanduser()
    out = Path(os.path.abspath(given)).resolve()
    for src in sources:
        if src is None:
            continue
        src = Path(src).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if _inside(out, src):
            raise OutputError(f"output {given} is the input model {src} or inside it; choose another folder")
        if _inside(src, out):
            raise OutputError(f"output {given} holds the input model {src}; choose another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"output {given} is an existing file, not a folder; remove it or choose another name")
        if any(out.iterdir()) and not overwrite and not is_output_folder(out):
            raise OutputError(f"output {given} is a non-empty folder that depgraph did not write; pass --overwrite "
                              f"(overwrite=True) to replace it, or choose another folder")
    _writable_ancestor(out)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(path) -> list:
    """Remove temporaries next to ``path`` left by dead processes; put back an OUT moved aside by a killed replace.

    Returns the removed or restored paths."""
    out = Path(path)
    parent, done = out.parent, []
    if not parent.is_dir():
        return done
    for item in sorted(parent.iterdir()):
        m = _TMP.match(item.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if m["role"] == "old" and not out.exists():
            os.rename(item, out)  # killed between the two renames of a replace: the old OUT is still good
        elif item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)  # a single-file output's temporary
        done.append(item)
    return done


def temporary_beside(out: Path) -> Path:
    """A fresh temporary name next to ``out`` that :func:`clean_stale` recognises once its owner is dead
    (``.OUT.depgraph-tmp-PID-XXXX``); stale ones of dead owners are removed first. Nothing is created."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    return out.parent / f".{out.name}.depgraph-tmp-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def output_folder(path, overwrite: bool = False, sources=(), kind: str = "model"):
    """Yield a fresh temporary folder; when the block ends without an exception, it becomes ``path``.

    Checks ``path`` with :func:`check_output` first, cleans stale temporaries, creates the folder with the umask's
    permissions (0755 under umask 022) and writes the marker (``{"kind": kind}``) last.
    """
    out = check_output(path, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.depgraph-tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        mark(tmp, kind)
        usual_permissions(tmp)
        _replace(tmp, out, out.parent / f".{out.name}.depgraph-old-{tag}", overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_permissions(folder) -> None:
    """Give ``folder`` and everything below it the permissions a plain mkdir/open would (0755/0644 under umask
    022): temporary files written by libraries (mkdtemp, safetensors) are 0700/0600."""
    umask = os.umask(0o22)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                executable = os.stat(p).st_mode & 0o111
                os.chmod(p, (0o777 if executable else 0o666) & ~umask)


def _replace(tmp: Path, out: Path, old: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (checked again: it may have appeared meanwhile) goes last."""
    if out.exists():
        check_output(out, overwrite)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
