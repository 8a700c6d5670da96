"""SIGTERM/SIGINT -> finish the current step, checkpoint it, exit cleanly.

One process: a Python handler sets a flag the loop reads after each step.

Several processes: every process must stop at the same step, whichever one got the signal. jax
owns that: `jax.distributed.initialize` installs a native SIGTERM handler whose notifier tells the
coordination service, which picks the step all processes stop at (the fastest one's next step;
`multihost_utils.reached_preemption_sync_point`, through orbax). A Python SIGTERM handler installed
later replaces the native one, and then the sync point never comes: a preempted multi-process
run used to train on and be killed. So with several processes SIGTERM is left to jax, and SIGINT
(which jax does not watch) is turned into a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
import threading

import jax


class Listener:
  """Context manager installing the handlers (main thread only) and restoring the old ones."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _flag(self, signum, frame):
    del signum, frame
    self.requested = True

  @staticmethod
  def _to_sigterm(signum, frame):
    del signum, frame
    os.kill(os.getpid(), signal.SIGTERM)  # reaches jax's native handler

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      if jax.process_count() > 1:
        handlers = {signal.SIGINT: self._to_sigterm}
      else:
        handlers = {signal.SIGTERM: self._flag, signal.SIGINT: self._flag}
      for sig, handler in handlers.items():
        self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def should_stop(self, ckpt, step: int) -> bool:
    """Whether to save `step` and stop; with several processes, called at every step by all."""
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self.requested
