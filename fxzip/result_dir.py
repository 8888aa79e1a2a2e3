"""Writing a result directory atomically (``fxzip.save``, ``fxzip merge --out``,
``fxzip sweep --out``).

A result folder ``OUT`` only ever changes by one rename, so after any
interruption (Ctrl-C, ``kill -9``, a full disk, a power cut once the kernel has
written what was fsynced) it holds either the previous complete result or the
new complete one, never a mix:

1. every file is written into a temporary sibling folder ``.OUT.tmp-PID``
   (same parent, so the renames below are atomic; created with the
   permissions the umask gives, like the files in it);
2. each file and the folder are fsynced, and every file gets the umask's mode
   (safetensors writes 0600);
3. the temporary folder takes ``OUT``'s place: on Linux one
   ``renameat2(RENAME_EXCHANGE)`` swaps the two folders (``OUT`` is never
   missing); elsewhere the old result is renamed aside to ``.OUT.old-PID`` and
   the new one renamed into place;
4. the parent folder is fsynced and the old result removed.

Leftovers of an interrupted write are judged by the next write to ``OUT``
(``recover``): an old result moved aside with nothing in ``OUT`` is restored;
beside a result in ``OUT`` it is removed; a temporary folder is removed (it
never became the result).

A result is **complete** when its marker file (``report.json`` for a merge,
``sweep.json`` for a sweep), written last, parses and lists in ``manifest``
the size of every other file, and the files have those sizes
(``is_complete``). A folder is **an fxzip result** of a kind when its marker
is a JSON object the kind recognises (``report.json`` with fxzip's ``format``
key; ``sweep.json`` whose ``settings.command`` is ``fxzip sweep``) and it holds
no file fxzip does not write there. Such a folder is replaced by a new result
of the same kind: that is what saving again means. Any other non-empty folder
is refused unless the caller says ``overwrite`` (``--overwrite``), which
replaces the folder and everything in it; the current directory, the home
directory and folders holding the command's inputs are never replaced.

Writers of one ``OUT`` exclude each other with an advisory ``flock`` on
``.OUT.lock`` beside it (released by the kernel when the holder dies, removed
by the holder when it is done); a second writer fails at once with the first
one's pid. The lock is re-entrant within a process (``fxzip merge`` holds it
from its argument checks to the end, and ``fxzip.save`` takes it again).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

__all__ = ["OutputError", "OutputBusy", "Kind", "MERGE", "SWEEP", "check", "lock", "recover", "writing", "Stage",
           "is_complete", "is_result", "target"]


class OutputError(ValueError):
    """An output folder that cannot (or must not) be written; the message says why and the fix."""


class OutputBusy(OutputError):
    """Another process holds the output folder's lock."""


@dataclass(frozen=True)
class Kind:
    """What one kind of fxzip folder holds."""

    marker: str                          # written last; says the folder is complete and what wrote it
    names: tuple[str, ...]               # every file fxzip may write in such a folder (marker included)
    recognise: Callable[[dict], bool]    # does this marker's JSON come from fxzip?
    label: str


PRETRAINED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
"""Every file a ``save_pretrained`` of a model and its tokenizer may write, for one
safetensors file of weights (``fxzip.hf.write_pretrained`` asks for one). Kept
here, not in ``fxzip.hf``: this module imports nothing of the package (it is
loaded on its own, e.g. by a signal handler's test)."""

MERGE = Kind("report.json", ("model.safetensors", "model.pt2", "state_dict.safetensors", "report.json",
                             "report.md", "correlation.png", "cuts.png") + PRETRAINED_FILES,
             lambda data: "format" in data, "fxzip merge result")
SWEEP = Kind("sweep.json", ("sweep.json", "sweep.csv", "sweep.png"),
             lambda data: isinstance(data.get("settings"), dict) and data["settings"].get("command") == "fxzip sweep",
             "fxzip sweep result")


def target(out: str | os.PathLike) -> Path:
    """``out`` as an absolute path (a symlink to a folder: the folder it points to)."""
    path = Path(os.path.abspath(out))
    return path.resolve() if path.is_symlink() else path


def _marker(folder: Path, kind: Kind) -> dict | None:
    try:
        data = json.loads((folder / kind.marker).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_result(folder: str | os.PathLike, kind: Kind) -> bool:
    """Whether ``folder`` is an fxzip folder of ``kind`` (its marker recognised,
    no file fxzip does not write there)."""
    folder = Path(folder)
    data = _marker(folder, kind)
    return data is not None and kind.recognise(data) and all(p.name in kind.names for p in folder.iterdir())


def is_complete(folder: str | os.PathLike, kind: Kind) -> bool:
    """Whether ``folder``'s marker lists every other file with the size it has."""
    folder = Path(folder)
    data = _marker(folder, kind)
    manifest = data.get("manifest") if data is not None else None
    if not isinstance(manifest, dict):
        return False
    names = {p.name for p in folder.iterdir()} - {kind.marker}
    return names == set(manifest) and all((folder / n).stat().st_size == manifest[n] for n in names)


def _describe(folder: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}"


def check(out: str | os.PathLike, kind: Kind, *, overwrite: bool = False, option: str = "--out",
          flag: str = "--overwrite", protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Check, without writing anything, that a result of ``kind`` can be written
    to ``out``: it is not a file; it exists or can be created (its nearest
    existing ancestor is a folder this process may write in); if it is a
    non-empty folder, it is a result of ``kind`` or ``overwrite`` is set; and
    it holds neither the current directory, the home directory nor a path in
    ``protect`` (the command's inputs). Returns ``target(out)``."""
    path = target(out)
    shown = f"{option} {out}"
    if path.exists() and not path.is_dir():
        raise OutputError(f"{shown} exists and is not a directory; pass a directory for the result files")
    ancestor = path.parent  # where the result's folder is renamed in: it must exist or be creatable
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{shown} cannot be created: {ancestor} is a file, not a folder; choose another {option}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{shown} cannot be written: no permission to write in {ancestor}; "
                          f"choose another {option}")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    for p in [Path.cwd(), Path.home(), *protect]:
        inner = target(p)
        if inner == path or path in inner.parents:
            raise OutputError(f"{shown} holds {inner}, which a result must not replace; choose another {option} "
                              "(a new or empty folder, or an earlier result)")
    if not overwrite and not is_result(path, kind):
        if _marker(path, kind) is not None and kind.recognise(_marker(path, kind) or {}):
            extra = sorted(p.name for p in path.iterdir() if p.name not in kind.names)
            what = f"an {kind.label} with other files too ({', '.join(extra[:5])})"
        else:
            what = _describe(path)
        raise OutputError(f"{shown} is not empty and not an {kind.label} ({what}); choose another {option}, or "
                          f"pass {flag} to replace that folder and everything in it")
    return path


_held: dict[Path, list] = {}  # target -> [fd, depth] of the locks this process holds
_held_guard = threading.Lock()


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def lock(out: str | os.PathLike, *, option: str = "--out") -> Iterator[Path]:
    """Hold the advisory lock of ``out`` (``flock`` on ``.OUT.lock`` beside it;
    its parent folders are created). Raises ``OutputBusy`` at once, naming the
    holder's pid, when another process holds it; re-entrant in one process."""
    path = target(out)
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            held = True
        else:
            held = False
    if held:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = _lock_path(path)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            try:
                pid = lock_file.read_text().strip() or "unknown"
            except OSError:
                pid = "unknown"
            raise OutputBusy(f"another fxzip is writing to {out} (pid {pid}); wait for it or choose another "
                             f"{option}") from None
        try:  # the holder before us may have removed the file it locked: lock the one at the path
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    with _held_guard:
        _held[path] = [fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            depth = _held[path][1] = _held[path][1] - 1
            if depth == 0:
                del _held[path]
        if depth == 0:
            with contextlib.suppress(OSError):
                os.unlink(lock_file)  # while still locked: a waiter re-checks the inode
            os.close(fd)


def _leftovers(path: Path, what: str) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.{what}-*"), key=lambda p: p.stat().st_mtime)


def recover(out: str | os.PathLike) -> list[str]:
    """Clean up after an interrupted write to ``out`` (call it holding ``lock``):
    restore an old result moved aside when ``out`` is missing, remove old
    results beside a result in place and temporary folders. Returns what it
    did, one sentence each."""
    path = target(out)
    if not path.parent.is_dir():
        return []
    done = []
    olds = _leftovers(path, "old")
    if olds and not os.path.lexists(path):
        os.rename(olds[-1], path)
        done.append(f"restored the previous result {path} from {olds[-1].name} (a write to it was interrupted)")
        olds = olds[:-1]
    for p in olds + _leftovers(path, "tmp"):
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name} beside {path} (left by an interrupted write)")
    if done:
        _fsync_dir(path.parent)
    return done


class Stage:
    """The temporary folder a result is written into (``path``)."""

    def __init__(self, path: Path):
        self.path = path

    def manifest(self, *, leave_out: Iterable[str] = ()) -> dict[str, int]:
        """Every file written so far with its size in bytes (for the marker)."""
        skip = set(leave_out)
        return {p.name: p.stat().st_size for p in sorted(self.path.iterdir()) if p.name not in skip}


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly process-wide)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(stage: Path, path: Path) -> None:
    """fsync and mode the staged files, then put the stage in ``path``'s place."""
    file_mode = 0o666 & ~_umask()
    for p in stage.iterdir():
        os.chmod(p, file_mode)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(stage)
    if not os.path.lexists(path):
        os.rename(stage, path)
        old = None
    elif _exchange(stage, path):
        old = stage  # the stage's name now holds the previous result
    else:
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(stage, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)


@contextlib.contextmanager
def _interrupts_noted() -> Iterator[list[int]]:
    """Record every Ctrl-C while a result is written (and raise it, as Python does).

    Why: Python raises the KeyboardInterrupt wherever the interpreter happens to
    be, and code that swallows exceptions there (a ``__del__``, a weakref
    callback, a library's ``except BaseException``) loses it; the save would then
    finish and put the new result in place after the user asked to stop. With
    the record, the commit refuses instead. Only in the main thread, and only
    where SIGINT has Python's default handler (a program's own handler stays)."""
    seen: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield seen
        return

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def writing(out: str | os.PathLike, kind: Kind, *, overwrite: bool = False, option: str = "--out",
            flag: str = "--overwrite", protect: Iterable[str | os.PathLike] = (),
            say: Callable[[str], Any] | None = None) -> Iterator[Stage]:
    """Write a result of ``kind`` to ``out`` atomically: takes the lock, cleans
    up leftovers (``say`` gets what was done; default: a warning), checks
    ``out`` (``check``), yields a ``Stage`` to write the files into (the marker
    last, with ``manifest``), then puts it in place. On an exception nothing in
    ``out`` changes and the temporary folder is removed."""
    path = check(out, kind, overwrite=overwrite, option=option, flag=flag, protect=protect)
    with lock(out, option=option):
        for sentence in recover(path):
            if say is None:
                import warnings

                warnings.warn(sentence, stacklevel=3)
            else:
                say(sentence)
        check(out, kind, overwrite=overwrite, option=option, flag=flag, protect=protect)
        stage = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:  # from before the folder exists: a Ctrl-C right after mkdir still removes it
            with _interrupts_noted() as interrupts:
                if os.path.lexists(stage):
                    shutil.rmtree(stage)
                os.mkdir(stage)  # 0777 less the umask, like any folder the user makes
                yield Stage(stage)
                if not (stage / kind.marker).exists():
                    raise RuntimeError(f"{kind.marker} was not written: the result in {stage} is incomplete")
                if interrupts:  # a Ctrl-C that something swallowed: stop before the result changes
                    raise KeyboardInterrupt
                _commit(stage, path)
        except BaseException:  # Ctrl-C included: back to the old result (or the new one, if it is in place)
            with contextlib.suppress(Exception):
                recover(path)
            raise
