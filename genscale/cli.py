"""What every entry point shares: the repo on sys.path, errors as one sentence, and checks that
an output can be written before long work starts."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NoReturn

from genscale.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line: the full usage of a command with fifty flags would
    bury the one line that says what is wrong, so it points to --help instead."""

    def error(self, message: str) -> NoReturn:
        wait_for_the_first_process()  # every process of a launch parses the same flags
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_output_path(path: str | Path, flag: str, folder: bool = False) -> None:
    """Raise UserError unless ``path`` (a file, or a folder when ``folder``) can be created or
    overwritten: checked before the work, so that hours of sampling are not lost at the end."""
    try:
        _check_output_path(Path(path), flag, folder)
    except OSError as err:  # a name too long for the file system, a loop of links, ...
        raise UserError(f"{flag} {path} cannot be written ({err.strerror or err})") from None


def _check_output_path(p: Path, flag: str, folder: bool) -> None:
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder; choose another {flag}")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {p} is a folder; give a file name")
    nearest = p if folder else p.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UserError(f"{flag} {p} cannot be created because {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p} cannot be written: {nearest} is not writable")


def make_folder(path: str | Path, flag: str, given: str | None = None) -> None:
    """mkdir -p, with one sentence when the folder cannot be created (``given``: the flag's value,
    when ``path`` is its parent folder): check_output_path cannot foresee every case (/proc and
    /sys look writable to root)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        what = f"{flag} {given}: its folder {path}" if given is not None else f"{flag} {path}"
        raise UserError(f"{what} cannot be created ({err.strerror or err})", exit_code=1) from None


def _file_name(out: str, flag: str) -> Path:
    """``out`` as a file name: not empty, not a folder's name ("dir/", ".", "..")."""
    path = Path(out)
    if not out or out.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise UserError(f"{flag} must name a file, got {out!r}")
    return path


def output_file(out: str, flag: str) -> Path:
    """The file ``out`` names, checked before the work: a file name, writable where it lies (its
    folder is made, and a file is created there and removed: /proc and /sys look writable to root
    but take no new file)."""
    path = _file_name(out, flag)
    check_output_path(path, flag)
    make_folder(path.parent, flag, out)
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".genscale-write-check-"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {out} cannot be written: {path.parent} takes no new file "
                        f"({err.strerror or err})", exit_code=1) from None
    return path


def output_files(out: str, flag: str = "--out") -> dict[str, Path]:
    """The files an image output ``out`` names, by kind (".png" a grid, ".npz" the arrays): both
    for a name without a suffix (beside a folder of that name, if there is one), else the one its
    suffix names in any case (``x.PNG`` is written as ``x.PNG``). UserError for another suffix or
    a file that cannot be written (output_file), so that both are found before the work."""
    path = _file_name(out, flag)
    kind = path.suffix.lower()
    if kind not in ("", ".png", ".npz") or path.name.endswith("."):  # "x.png." has no suffix: x.png..png
        raise UserError(f"{flag} must end in .png or .npz (or have no suffix for both), got {out}")
    files = {kind: path} if kind else {k: path.with_suffix(k) for k in (".png", ".npz")}
    for file in files.values():
        output_file(str(file), flag)
    return files


def quiet_interrupt_while_starting() -> None:
    """Until run_main starts, Ctrl-C ends the process as run_main would ("interrupted", 130):
    an entry point spends its first seconds importing torch, and Python's own handler printed a
    KeyboardInterrupt traceback from inside that import."""
    def interrupted(_signum, _frame) -> None:
        if _prints_errors():  # Ctrl-C reaches every process of the launch
            os.write(2, b"interrupted\n")
        os._exit(130)  # nothing has started that needs cleaning up

    signal.signal(signal.SIGINT, interrupted)


# Until the entry point's Accelerator exists, every process of a multi-process launch runs the
# same checks on the same flags and files, so a refusal there is raised by all of them alike and
# was printed once per GPU. The first process of each node (a node may see other files) says it
# at once; the others wait FIRST_PROCESS_GRACE_S first: the launcher stops every process when one
# exits with an error, so a process that outlives the wait had an error of its own and says it
# (the first process to exit has always said its error). From the Accelerator on
# (launch.new_accelerator calls ranks_started), an error may be one rank's own: no wait.
FIRST_PROCESS_GRACE_S = 5.0
_ranks_started = False


def ranks_started() -> None:
    global _ranks_started
    _ranks_started = True


def _prints_errors() -> bool:
    return _ranks_started or os.environ.get("LOCAL_RANK", "0") == "0"


def wait_for_the_first_process() -> None:
    if not _prints_errors():
        time.sleep(FIRST_PROCESS_GRACE_S)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None,
             memory_hint: str = "use a smaller --batch-size") -> None:
    """Call ``main`` and turn a UserError into one line on stderr and its exit code (an allocation
    failure too, with ``memory_hint``: the entry point's own flags)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt again (see above)
    try:
        code = main(argv)
    except UserError as err:
        if str(err):
            wait_for_the_first_process()
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if _prints_errors():
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as err:
        reason = out_of_memory(err)
        if reason is None:
            raise
        print(f"error: out of memory ({reason}); {memory_hint}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def out_of_memory(err: BaseException) -> str | None:
    """What ran out, for an allocation failure (torch raises a RuntimeError on the CPU and its
    RuntimeError subclass OutOfMemoryError on a GPU); None for any other error."""
    if isinstance(err, MemoryError):
        return "the host's memory"
    text = str(err)
    if "CUDA out of memory" in text or type(err).__name__ == "OutOfMemoryError":
        return "the GPU's memory"
    asked = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if asked:
        return f"{int(asked.group(1)) / 2**30:.1f} GiB asked for at once"
    return None
