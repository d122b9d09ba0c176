"""Write outputs so that nothing half-written is ever left behind.

Every artifact is written into a temporary sibling and moved into place with
``os.replace`` only once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compiler.errors import EdgeqError


def check_output_dir(path: str | os.PathLike) -> Path:
    """``path`` as an absolute path, if it can become an output folder; else a one-line EdgeqError.

    Refused: an existing file (or anything not a folder) at ``path``, a file where
    one of its parent folders would have to be, a nearest existing folder that is
    not writable. Callers check before any work, so a bad ``-o`` fails fast.
    """
    final = Path(path).resolve()
    if os.path.lexists(final) and not final.is_dir():
        raise EdgeqError(f"output path {path} exists and is not a folder; give a folder to write the outputs to")
    ancestor = final
    while not os.path.lexists(ancestor) and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if ancestor != final and not ancestor.is_dir():
        raise EdgeqError(f"cannot create output folder {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EdgeqError(f"cannot write output folder {path}: {ancestor} is not writable")
    return final


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` as an absolute path, if a file can be written there; else a one-line EdgeqError."""
    final = Path(path).resolve()
    if final.is_dir():
        raise EdgeqError(f"output file {path} is a folder; give a file name")
    check_output_dir(final.parent)
    return final


# What the last edgeq run wrote into an output folder (one name per top-level entry).
OUTPUTS_MANIFEST = ".edgeq-outputs.json"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replaces_outputs: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` on success.

    On error the temporary directory is removed and ``final`` is untouched.
    Files already in ``final`` that the new run does not write are kept --
    unless ``replaces_outputs``: then the entries the previous run recorded in
    ``final``'s :data:`OUTPUTS_MANIFEST` and this run does not write are
    removed, and this run's entries are recorded (so a reused output folder
    holds only the last run's outputs; files edgeq did not write are never
    touched). The temporary directory never outlives the call, even when
    moving the outputs into place fails; a ``final`` that cannot be a folder
    is an EdgeqError before anything is written (:func:`check_output_dir`).
    """
    final = check_output_dir(final)
    created = _make_parents(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    committed = False
    try:
        yield tmp
        final.mkdir(exist_ok=True)
        previous = recorded_outputs(final) if replaces_outputs else []
        written = sorted(entry.name for entry in tmp.iterdir())
        for name in written:
            entry, target = tmp / name, final / name
            if _in_the_way(entry, target):
                _remove(target)
            os.replace(entry, target)
        committed = True
        if replaces_outputs:
            for name in previous:
                if name not in written:
                    _remove(final / name)
            atomic_write_text(final / OUTPUTS_MANIFEST,
                              json.dumps({"written_by": "edgeq", "outputs": written}, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not committed:
            for folder in created:  # innermost first; only the empty ones this call made
                with contextlib.suppress(OSError):
                    folder.rmdir()


def recorded_outputs(folder: Path) -> list[str]:
    """The entry names ``folder``'s manifest says edgeq wrote (none without a readable manifest).

    Only plain names of entries directly in ``folder`` count: a manifest edited to
    name ``..``, a path or the manifest itself names nothing.
    """
    try:
        names = json.loads((folder / OUTPUTS_MANIFEST).read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(names, list):
        return []
    return [name for name in names if isinstance(name, str) and name not in ("", ".", "..", OUTPUTS_MANIFEST)
            and Path(name).name == name and os.sep not in name and (os.altsep or os.sep) not in name]


def _in_the_way(entry: Path, target: Path) -> bool:
    """Whether ``target`` must go before ``entry`` can replace it (``os.replace`` swaps files only)."""
    if not os.path.lexists(target):
        return False
    return (target.is_dir() and not target.is_symlink()) or entry.is_dir()


def _remove(path: Path) -> None:
    """Remove a file, symlink (not what it points to) or folder; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it made, innermost first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` (a temporary build folder about to be written again)."""
    for entry in path.iterdir():
        _remove(entry)
