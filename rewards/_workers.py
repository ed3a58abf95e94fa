"""Calling a reward function with a time limit: in the caller's thread, a worker thread, or a worker process.

- ``"none"``: a plain call; no time limit can be enforced.
- ``"thread"``: each call runs in a fresh daemon thread; after ``timeout_s`` the caller stops
  waiting and moves on. Python cannot kill a thread, so a stuck call keeps running in the
  background (counted by :attr:`ThreadCaller.stuck`) until it returns; its result is discarded.
- ``"process"``: one persistent worker process per reward function, started on first use; after
  ``timeout_s`` the worker is killed and a new one is started for the next call. The reward
  function and the batch must be picklable.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
from typing import Any

__all__ = ["DirectCaller", "ProcessCaller", "RewardTimeoutError", "ThreadCaller", "WorkerError", "make_caller"]


class RewardTimeoutError(TimeoutError):
    """A reward function did not return within its time limit."""


class WorkerError(RuntimeError):
    """A reward function failed inside a worker process (the message carries the remote traceback)."""


class DirectCaller:
    """Call in the current thread (no time limit)."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def call(self, kwargs: dict[str, Any], timeout_s: float | None) -> Any:
        """Run the function on ``kwargs``."""
        return self.func(**kwargs)

    def close(self) -> None:
        """Nothing to release."""


class ThreadCaller:
    """Call in a fresh daemon thread and stop waiting after ``timeout_s``."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self._stuck: list[threading.Thread] = []

    @property
    def stuck(self) -> int:
        """Timed-out calls still running in the background."""
        self._stuck = [t for t in self._stuck if t.is_alive()]
        return len(self._stuck)

    def call(self, kwargs: dict[str, Any], timeout_s: float | None) -> Any:
        """Run the function on ``kwargs``; raise :class:`RewardTimeoutError` after ``timeout_s`` seconds."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["out"] = self.func(**kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e

        name = f"reward-{getattr(self.func, '__name__', 'fn')}"
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            self._stuck.append(thread)
            raise RewardTimeoutError(f"no result after {timeout_s} s")
        if "err" in box:
            raise box["err"]
        return box.get("out")

    def close(self) -> None:
        """Stuck threads are daemons; nothing to join."""


def _serve(func: Any, conn: Any) -> None:
    """Worker loop: receive keyword arguments, send back ("ok", result) or ("error", text)."""
    while True:
        try:
            kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if kwargs is None:
            return
        try:
            conn.send(("ok", func(**kwargs)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class ProcessCaller:
    """Call in a persistent worker process, killed and restarted when a call times out."""

    def __init__(self, func: Any, context: str | None = None) -> None:
        self.func = func
        self._ctx = mp.get_context(context)
        self._proc: Any = None
        self._conn: Any = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(self.func, child), daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
            self._conn.close()
        self._proc = self._conn = None

    def call(self, kwargs: dict[str, Any], timeout_s: float | None) -> Any:
        """Run the function on ``kwargs`` in the worker; kill it after ``timeout_s`` seconds."""
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self.restarts += 1
                self._kill()
            try:
                self._start()
            except Exception as e:
                self._proc = self._conn = None
                raise WorkerError(f"could not start the worker process (reward not picklable?): {e}") from e
        try:
            self._conn.send(kwargs)
        except Exception as e:
            self._kill()
            raise WorkerError(f"could not send the batch to the worker process (not picklable?): {e}") from e
        if not self._conn.poll(timeout_s):
            self._kill()
            self.restarts += 1
            raise RewardTimeoutError(f"no result after {timeout_s} s; worker process killed")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as e:
            self._kill()
            raise WorkerError("the worker process died during the call") from e
        if status == "error":
            raise WorkerError(payload)
        return payload

    def close(self) -> None:
        """Stop the worker process."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(2)
            except (OSError, ValueError):
                pass
        self._kill()


#: how a reward function is called: in the training process, in a thread (timeouts), or in a child process.
ISOLATIONS = ("none", "thread", "process")


def make_caller(func: Any, isolation: str, context: str | None = None) -> DirectCaller | ThreadCaller | ProcessCaller:
    """The caller for an isolation mode: ``"none"``, ``"thread"`` or ``"process"``."""
    if isolation == "none":
        return DirectCaller(func)
    if isolation == "thread":
        return ThreadCaller(func)
    if isolation == "process":
        return ProcessCaller(func, context)
    raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
