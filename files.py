"""
Writing files safely: a crash, kill -9 or Ctrl-C at any moment leaves the old file or the new one,
never half of one; what a killed process left half-written is cleaned up by the next run; one run at
a time writes into an out_dir; and a signal to stop waits for the file being written (StopSignals,
signals_deferred).
"""

import os
import shutil
import signal
import threading
from contextlib import contextmanager

from filelock import FileLock, Timeout

from configurator import UserError
from device import any_process


def write_atomic(path, write):
    """Call write(f) on a temporary file beside path (a name no other process uses), flush it to disk,
    then rename it over path. A write that failed because the disk did (full, say) raises that
    OSError, also where the writer reported it as another error (torch.save: a RuntimeError)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:
                if isinstance(e.__cause__ or e.__context__, OSError):
                    raise (e.__cause__ or e.__context__) from None
                raise
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


class OutDirBusy(UserError):
    pass


def lock_out_dir(out_dir):
    """Take out_dir/.lock for this process, so that one run at a time writes there: a second run
    into the same out_dir is refused while the first lives. The operating system releases the lock
    when its holder ends, however it ends (kill -9 and power cuts included). Returns the lock;
    release it with .release()."""
    lock = FileLock(os.path.join(out_dir, ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutDirBusy(f"another run is training into out_dir '{out_dir}' (it holds {os.path.join(out_dir, '.lock')}); "
                         f"wait for it to end, or train into another --out_dir") from None
    return lock


@contextmanager
def signals_deferred():
    """Within this context SIGINT (Ctrl-C) and SIGTERM wait: they act as they would have once it ends,
    so that a pair of renames that must not be split is done whole. (Signal handlers can be set in
    the main thread only; elsewhere nothing is deferred.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:
            if callable(previous[s]):
                previous[s](s, None)  # Python's own (KeyboardInterrupt for SIGINT) or the program's
            elif previous[s] == signal.SIG_DFL:
                os.kill(os.getpid(), s)


class StopSignals:
    """Within this context SIGINT (Ctrl-C) and SIGTERM set .received instead of killing the process,
    so a training loop can finish its step and save. A second Ctrl-C stops at once; more SIGTERMs
    change nothing, because torchrun forwards the one it gets and schedulers (SLURM) often signal
    every process as well: a process may see two for one request to stop."""

    def __init__(self):
        self.received = None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def asked(self, iter_num, log_interval, procs, device):
        """Whether a signal asked any process to stop. Under torchrun a signal may reach some processes
        only; they vote on it at log steps (all processes call this at every step)."""
        vote = procs.world_size == 1 or iter_num % log_interval == 0
        return vote and any_process(self.received is not None, procs, device)
