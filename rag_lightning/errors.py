"""User errors and stop signals: reported as one clear line, with exit code 2 (or 128 + the signal's number).

Every command's main is wrapped in `exit_on_user_error`, so this holds for all of them.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("rag_lightning")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RAY_ADDRESS_KEY = "service.ray_address"


class UserError(Exception):
    """A mistake in the user's input; the message names the file and line, or the config key."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGINT) raised as an exception where the command was, so every cleanup on the way
    out runs: files written under a temporary name or into a staging folder are removed, an uncommitted knowledge
    base build is removed, a Ray the command started is shut down. A KeyboardInterrupt, so code that cleans up
    after Ctrl+C (Lightning's trainer, Ray) does so for SIGTERM too, and `except Exception` does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: int | None = None  # the first stop signal this command got


def _stop(signum: int, frame) -> None:
    """The handler of the stop signals while a command runs: raise Interrupted, once.

    When called by another handler that chains it (Lightning's SIGTERM handler during fit does, keeping the
    one it found), it only records the signal: Lightning then stops at the end of the step, on every rank
    together (SIGTERMException), and the wrapper reports the stop. A second signal while the cleanup runs is
    recorded and otherwise ignored, so the cleanup is not cut short (SIGKILL still ends the process).
    """
    global _received
    first = _received is None
    if first:
        _received = signum
    if first and signal.getsignal(signum) is _stop:
        raise Interrupted(signum)


def record_stop(signum: int) -> None:
    """Take note of a stop signal without raising: for handlers that stop the command at a point of their
    choosing (rag_lightning.callbacks.stop_signals: the next training step, on every rank together)."""
    global _received
    if _received is None:
        _received = signum


def stop_received() -> int | None:
    """The first stop signal this command got, if any."""
    return _received


def handles_stop_signal(signum: int) -> bool:
    """Whether the command's own handler (installed by exit_on_user_error) is the one that gets signum now."""
    return signal.getsignal(signum) is _stop


def _install_stop_handlers() -> dict[int, Any]:
    """Handle SIGTERM and SIGINT where no function of someone else's does yet; returns the handlers replaced.

    A default or ignored disposition is taken over: a process that a non-interactive shell started in the
    background (`cmd &` in a script, a CI harness) inherits SIGINT ignored, and Python keeps it so; a command
    that honoured it would sleep through the `kill -INT` meant to stop it. A handler function someone installed
    before the command started (a launcher such as submitit's) is left alone. Lightning installs its own later,
    during fit, and chains this one (see _stop); the SLURM requeue signal, SIGUSR1, is never touched. Only the
    main thread can set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced: dict[int, Any] = {}
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler):
            replaced[signum] = current
            signal.signal(signum, _stop)
    return replaced


def _restore_handlers(replaced: dict[int, Any]) -> None:
    for signum, handler in replaced.items():
        if signal.getsignal(signum) is _stop:  # not if someone took the signal over since
            signal.signal(signum, handler)


def exit_on_user_error(main):
    """Run main; a UserError (or a corrupted knowledge base, a Ray address where nothing answers, a full disk)
    prints one line and exits 2, no traceback. SIGTERM and SIGINT stop it the same way, with one line and exit code
    128 + the signal's number, after the cleanup on the way out has removed what the command had not finished."""
    from retrieval_workers import DISK_FULL, RayUnreachable, RetrievalWorkersError

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        global _received
        _received = None
        replaced = _install_stop_handlers()
        try:
            return main(*args, **kwargs)
        except RayUnreachable as e:  # the address came from the config, or from the job's environment
            _exit(f"error: {e.setting or RAY_ADDRESS_KEY}: {e}", 2)
        except (UserError, RetrievalWorkersError) as e:
            _exit(f"error: {e}", 2)
        except Exception as e:
            if _received is not None:
                log.debug("while stopping on %s", signal.Signals(_received).name, exc_info=True)
                _exit_stopped(_received)
            if isinstance(e, OSError) and e.errno in DISK_FULL:  # raised by atomic_files, naming the file
                _exit(f"error: {e.filename}: {e.strerror}; it was not written (what was there before is kept)", 2)
            raise
        except BaseException as e:
            # Interrupted, or a SystemExit or KeyboardInterrupt that a library raised after the signal (Lightning:
            # SIGTERMException after its step, or sys.exit(1) after its Ctrl+C cleanup)
            signum = e.signum if isinstance(e, Interrupted) else _received
            if signum is None:
                raise
            _exit_stopped(signum)
        finally:
            _restore_handlers(replaced)

    return wrapper


def _exit_stopped(signum: int) -> None:
    name = signal.Signals(signum).name
    _exit(f"error: stopped by {name}; unfinished files were removed", 128 + signum)


def _exit(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


class CheckOutputDir(Callback):
    """Refuse a run or sweep dir that cannot be created with one error line, before Hydra tries to create it
    (and fails with a traceback). Every entry config lists it under hydra.callbacks."""

    def on_run_start(self, config, **kwargs) -> None:
        _check_output_dir("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_output_dir("hydra.sweep.dir", config.hydra.sweep.dir)


def _check_output_dir(key: str, path: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: {key}: {path} is not writable ({e.strerror})", file=sys.stderr)
        sys.exit(2)
