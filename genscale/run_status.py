"""Tell slurm/common.sh that the command completed, so that a warning (USR1) or the time limit
that came after the last step does not requeue a finished job.

The batch shell exports GENSCALE_STATUS_FILE (a path on the shared file system, unique to the
job) and removes the file before the step starts; the launch's main process calls
``report_finished()`` once the run has completed. Outside such a job the variable is unset and
nothing is written.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

STATUS_FILE_VARIABLE = "GENSCALE_STATUS_FILE"
FINISHED = "finished"


def report_finished() -> None:
    """Write "finished" to $GENSCALE_STATUS_FILE atomically (a temporary file in the same folder,
    then os.replace), so that the shell reads the whole word or no file. A failure only warns:
    the run has completed, and the shell then keeps its old behaviour (it may requeue, and the
    requeued job finds nothing to do)."""
    target = os.environ.get(STATUS_FILE_VARIABLE)
    if not target:
        return
    path = Path(target)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(FINISHED + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        print(f"warning: cannot write {path} ({err}); the job may be requeued once more and then "
              "find nothing to do", file=sys.stderr)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
