"""Atomic writes: a reader (or a resumed run) never sees a half-written file or directory."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from llm_train.errors import UserError


def atomic_write_bytes(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; outputs are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename (old one removed after).

    A README.md in the old directory (the committed ones in tokenizer/, output/, ...) is carried over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a save that was killed: never resumed from
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if (path / "README.md").is_file() and not (tmp / "README.md").exists():
            shutil.copy2(path / "README.md", tmp / "README.md")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(path):
    """Create `path` if needed and prove we can write there, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {path} ({e.strerror}): choose another with the output flag "
                        "or fix its permissions") from None
