"""Ctrl-C (SIGINT) and SIGTERM for the search driver: stop the whole search, resumable.

The first signal stops the search: inside a Tune experiment it is handed to Tune's own stop
handler (Tune's SIGUSR1 handler, which ends the experiment loop and saves its state; the
running trials keep their last checkpoint and resume from it), and the driver then raises
``Interrupted`` instead of going on to the next stage or writing tables and the report;
outside Tune it raises ``Interrupted`` at once. The CLI prints how to resume and exits
128 + the signal (130 for SIGINT, 143 for SIGTERM). A second signal exits at once.

Tune's own SIGINT handler is turned off (TUNE_DISABLE_SIGINT_HANDLER) while this is
installed: it would stop only the current experiment and let the driver go on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The search was stopped by a signal (its number: ``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state: dict = {"signum": None, "in_tune": False}


def _handle(signum, frame) -> None:
    if _state["signum"] is not None:  # the second signal: no more waiting
        os.write(2, f"raysae: {signal.Signals(signum).name} again: exiting now\n".encode())
        os._exit(128 + signum)
    _state["signum"] = signum
    print(f"raysae: {signal.Signals(signum).name} received: stopping the search (running "
          "trials keep their last checkpoint); send it again to exit at once",
          file=sys.stderr, flush=True)
    tune_stop = signal.getsignal(signal.SIGUSR1)
    if _state["in_tune"] and callable(tune_stop):
        tune_stop(signal.SIGUSR1, frame)  # Tune ends its loop and saves the experiment
        return
    raise Interrupted(signum)


def reinstall() -> None:
    """Take the signals back after ``ray.init`` (Ray's core worker installs its own SIGTERM
    handler in the driver, which kills the process at once)."""
    if _state.get("active") and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handle)


def check() -> None:
    """Raise ``Interrupted`` if a stop signal came."""
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"])


@contextlib.contextmanager
def stop_on_signals():
    """Install the handlers for the whole job (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    _state.update(signum=None, in_tune=False, active=True)
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        stopped = _state["signum"] is not None
        if not stopped:  # after a stop signal a second one still exits at once, until exit
            for s, handler in old.items():
                signal.signal(s, handler)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env
        _state.update(in_tune=False, active=False)


@contextlib.contextmanager
def tune_stage():
    """Around one ``tuner.fit()``: a signal stops Tune; ``Interrupted`` follows the fit."""
    check()
    usr1 = signal.getsignal(signal.SIGUSR1)
    _state["in_tune"] = True
    try:
        yield
    finally:
        _state["in_tune"] = False
        with contextlib.suppress(ValueError, TypeError):  # Tune leaves its handler behind
            signal.signal(signal.SIGUSR1, usr1 if usr1 is not None else signal.SIG_DFL)
    check()
