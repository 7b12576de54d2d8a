"""One training process per run folder.

Two launches on the same --out (a double sbatch, a requeue while the old job still runs, the same
command in two terminals) would both train, publish each other's step folders, prune each
other's checkpoints and interleave metrics.jsonl. The main process therefore holds an exclusive
advisory lock on OUT/.lock for its lifetime; the kernel releases it when the process ends, however
it ends (SIGKILL, a node failure), so a stale lock never blocks a resume. It is a POSIX record
lock (lockf), not flock: forked data-loader workers inherit the file but not a record lock, so a
killed trainer's workers, still exiting, cannot hold it against the resume (they did, with flock);
record locks also work over NFS. Where the file system has no locks, training goes on without one.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from genscale.cli import make_folder
from genscale.errors import UserError

_HELD: dict[Path, object] = {}  # open lock files, kept for the life of the process


def lock_run_folder(out: Path) -> None:
    """Take OUT/.lock, or refuse in one sentence naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to take
        return
    out = Path(out).resolve()
    if out in _HELD:
        return
    make_folder(out, "--out")
    handle = open(out / ".lock", "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        # (A node that died holding the lock on NFS may leave it held: then deleting .lock is safe.)
        raise UserError(f"{out} is being trained by {holder}; wait for it to end or choose another --out "
                        f"(if that process is gone, e.g. its node failed, delete {out / '.lock'})",
                        exit_code=1) from None
    except OSError:  # e.g. ENOLCK on a mount without locks
        handle.close()
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _HELD[out] = handle
