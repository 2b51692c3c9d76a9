"""Write files and folders the way git does: to a temporary name beside the target, fsynced, then renamed.

A reader (or a crash, a full disk, Ctrl-C) sees either the old file or the whole new one, never half of one, and a
failed write leaves what was there before untouched and no temporary file behind. The rename replaces a symlink at
the target instead of writing through it, so a dangling link is never followed.

Every tunelab write of a result the user keeps goes through here: run files, checkpoints, exports, predictions.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

from .errors import TunelabError

# safetensors raises its own error type (a full disk included), not OSError
WRITE_ERRORS = (OSError, SafetensorError)


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name in the same folder (a rename only stays atomic within one file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root` (and root itself) on disk."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(dirpath))


def write_error(e: BaseException, path: Path, what: str) -> TunelabError:
    """One paragraph for a write that failed (full disk, no permission, a file system that refuses it)."""
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free disk space (or choose a folder on another disk) and run the command again"
    elif "No space left" in str(e) or "os error 28" in str(e):  # safetensors' own error type wraps the OS error
        reason, fix = "No space left on device", "Free disk space (or choose a folder on another disk) and run the command again"
    else:
        fix = "Choose a writable location and run the command again"
    return TunelabError(f"Could not write {what} '{path}': {reason}. Nothing was replaced: what was at that path "
                        f"before is as it was, and no temporary file is left. {fix}.")



@contextmanager
def staged_file(path: str | Path, what: str = "the file"):
    """`with staged_file(p) as tmp: save(tmp)`: the block writes `tmp`; on success it is fsynced and renamed to `p`,
    on any failure removed. OSError and safetensors' errors become one TunelabError naming `p` and `what`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        _remove(tmp)
        raise write_error(e, path, what) from None
    except BaseException:
        _remove(tmp)
        raise
    sync_folder(path.parent)


def sync_folder(path: Path) -> None:
    """Make a rename in `path` durable. Best effort: the file itself is on disk already, and some file systems
    refuse to fsync a folder."""
    with suppress(OSError):
        fsync_path(path)


def write_bytes(path: str | Path, data: bytes, what: str = "the file") -> Path:
    with staged_file(path, what) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, what: str = "the file") -> Path:
    return write_bytes(path, text.encode("utf-8"), what)


def finite(obj):
    """`obj` with NaN and ±inf floats as None: JSON has no NaN, and a file with one is not valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj, what: str = "the file") -> Path:
    return write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n", what)


@contextmanager
def staged_dir(path: str | Path, what: str = "the folder", remove_old=shutil.rmtree):
    """`with staged_dir(out) as tmp: fill(tmp)`: the block fills the new folder `tmp` beside `out`; on success it is
    fsynced and swapped in (`swap`), and a folder that was at `out` is removed last by `remove_old`; on any failure
    `tmp` is removed and `out` is as it was. The caller has checked that `out`, if it exists, may be replaced."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        old = swap(tmp, path)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, path, what) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        remove_old(old)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): at no moment is either name missing.
    False where the system cannot (not Linux, an old kernel or libc, a file system without it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap(new: Path, target: Path) -> Path | None:
    """Put the finished folder `new` at `target`. Where `target` exists it is swapped out, not deleted: its old
    contents are returned under the name `new` had (or a fresh hidden name), for the caller to delete last."""
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        sync_folder(target.parent)
        return None
    if exchange(new, target):
        sync_folder(target.parent)
        return new
    old = temp_name(target, "old")
    os.rename(target, old)  # the short window where `target` is missing; `old` still holds everything
    os.rename(new, target)
    sync_folder(target.parent)
    return old


def _remove(p: Path) -> None:
    with suppress(OSError):
        os.unlink(p)
