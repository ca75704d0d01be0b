"""
Writing files safely: a crash or kill -9 at any moment leaves the old file or the new one, never half
of one, and what a killed process left half-written is cleaned up by the next run.
"""

import os
import shutil


def write_atomic(path, write):
    """Call write(f) on a temporary file beside path (a name no other process uses), flush it to disk,
    then rename it over path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we can't tell: leave its files alone
    return True


def dead_leftovers(folder, prefix):
    """Names in folder of the form prefix + 'tmp' + PID (+ anything) whose process PID is gone."""
    names = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = name[len(prefix) + 3:].split(".")[0] if name.startswith(prefix + "tmp") else ""
        if pid.isdigit() and not process_alive(int(pid)):
            names.append(name)
    return names


def remove_leftovers(folder, prefix):
    """Remove what killed processes left in folder (see dead_leftovers)."""
    for name in dead_leftovers(folder, prefix):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
