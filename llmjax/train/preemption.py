"""SIGTERM/SIGINT -> finish the current step, checkpoint it, exit cleanly.

With one process a signal sets a flag the loop reads after each step. With several, every
process must stop at the same step: jax's preemption sync point (through orbax) decides.
"""

from __future__ import annotations

import signal
import threading

import jax


class Listener:
  """Context manager installing the handlers (main thread only) and restoring the old ones."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def should_stop(self, ckpt, step: int) -> bool:
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self.requested
