"""Stop signals, from the first moment of a `simpo` process to its last.

SIGTERM, SIGUSR1 (what SLURM and Kubernetes send before they stop a job) and a first Ctrl-C ask
a run to stop: a training process finishes the optimizer step it is in, saves a checkpoint and
exits 75 (faults.StepGuard); a stage without a Trainer stops where its work is kept
(`stop_now`); and a process that has not reached either yet (still importing, loading the recipe,
printing the plan, about to launch) exits 75 without starting anything. The same command then
resumes. A second Ctrl-C exits 130 at once.

Python's default for SIGTERM and SIGUSR1 is to die at once (exit 143, 138), and a scheduler may
send them at any time, even seconds after a job starts: so the entry point (`simpo_cli.__main__`)
takes the signals before it imports anything else (`take`), and only the commands that do not
run stages give them back (`release`), acting then on any that came in between.

Under our launcher the training processes run in sessions of their own and do not see the
terminal or a `kill` of the `simpo` process, so the launcher passes the request on
(`forwarding`).

No torch here: this module loads before everything else.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from simpo_cli.errors import EXIT_ABORTED, Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_ENV = "SIMPO_STOP_SIGNAL"  # set by the launcher for training processes it has yet to start


@dataclass
class StopRequest:
    """What this process's signal handlers have seen."""

    signal: int = 0  # the first stop signal received; 0: none
    interrupts: int = 0  # Ctrl-Cs received
    # What a stop does at this point of the run, for the line printed when one arrives; None
    # while the command is not known yet (its own line, or the signal's default, says it).
    then: str | None = None


REQUEST = StopRequest()


def _stderr(line: str) -> None:
    # os.write, not print: a handler runs between two bytecodes of the main thread, which may be
    # halfway through writing to sys.stderr itself (tqdm's bar), and print would then fail.
    os.write(2, (line + "\n").encode())


def _speaks() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT:
        REQUEST.interrupts += 1
        if REQUEST.interrupts > 1:
            _stderr("aborted by a second Ctrl-C; nothing more was saved")
            os._exit(EXIT_ABORTED)
    if REQUEST.signal:
        return  # already stopping: a scheduler may signal every process, and the launcher too
    REQUEST.signal = signum
    if _speaks() and REQUEST.then:
        again = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
        _stderr(f"{signal.Signals(signum).name}: {REQUEST.then}{again}")


def take(then: str | None = None) -> None:
    """From now on a stop signal is a request to stop (`then` says how, for the line printed
    when one arrives); one the launcher passed on before it started this process counts too."""
    REQUEST.then = then or REQUEST.then
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    if os.environ.get(STOP_ENV) and not REQUEST.signal:
        REQUEST.signal = signal.Signals[os.environ[STOP_ENV]]


def release() -> None:
    """Where `take` has them: give the signals back to their defaults (for commands that run no
    stage: a Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process), and act now on one that
    came in already."""
    if signal.getsignal(signal.SIGTERM) is not _on_signal:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    if REQUEST.signal:
        signum, REQUEST.signal = REQUEST.signal, 0
        signal.raise_signal(signum)


def ignore() -> None:
    """Stopping is done: more stop signals (a scheduler or script repeating its request) are
    ignored from now on. Python gives the signals their defaults back while it exits, and a
    repeat would then kill the process with 138 or 143 instead of letting it exit 75."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_requested() -> bool:
    """A stop signal has reached this process (stages without a Trainer poll this)."""
    return REQUEST.signal != 0


def stop_now(stage: str, what: str) -> None:
    """Raise Preempted when a stop signal has arrived: for stages whose work is kept as it is
    written (generate) or is quick to redo (annotate), and for points between stages."""
    if REQUEST.signal:
        name = signal.Signals(REQUEST.signal).name
        raise Preempted(f"[{stage}] stopped by {name}; {what}; run the same command again to go on")


@contextmanager
def forwarding() -> Iterator[StopRequest]:
    """In the launcher (`accelerate launch` run in this process): pass SIGTERM and SIGUSR1 on to
    the training processes, and a first Ctrl-C as SIGTERM (where the terminal also sent them the
    Ctrl-C, it stays their first); a second Ctrl-C kills them and exits 130. torchrun's agent,
    left to itself, would forward SIGTERM and SIGINT only and kill the processes 30 s later, which
    a large checkpoint may not survive: the caller keeps the agent off these signals
    (PET_SIGNALS_TO_HANDLE) and the agent then sees the processes exit 75 after their save.
    Yields this process's REQUEST, which records the stop as `_on_signal` does."""
    import psutil

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            REQUEST.interrupts += 1
            if REQUEST.interrupts > 1:
                for process in psutil.Process().children(recursive=True):
                    _quietly(process.kill)
                _stderr("aborted by a second Ctrl-C; the training processes were killed")
                os._exit(EXIT_ABORTED)
        REQUEST.signal = REQUEST.signal or signum
        forwarded = signal.Signals(signal.SIGTERM if signum == signal.SIGINT else signum)
        # Processes not started yet (rendezvous under way) read it from their environment.
        os.environ[STOP_ENV] = forwarded.name
        for process in psutil.Process().children():
            _quietly(process.send_signal, forwarded)

    before = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    if REQUEST.signal:  # it came just before: the processes start stopped
        os.environ[STOP_ENV] = signal.Signals(REQUEST.signal).name
    try:
        yield REQUEST
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def _quietly(action, *args) -> None:
    import psutil

    try:
        action(*args)
    except psutil.NoSuchProcess:
        pass
