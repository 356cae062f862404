"""Stop requests (SIGTERM, SIGINT) turned into a clean stop at a step boundary.

One process: the handlers set a flag; the loop checks it after each step (a Python bool, no
device work) and saves. Several processes: every host must stop at the same step, or the
collective save hangs. JAX's preemption sync manager (started by ``jax.distributed.initialize``)
already catches SIGTERM in C++ and agrees on a step with the other hosts through the coordination
service in the background; ``multihost_utils.reached_preemption_sync_point(step)`` then reads a
local answer, so the loop never gathers a flag across hosts (a host-device sync) per step.

The handlers are installed by ``cli.run_main`` before anything slow (imports, compiling,
restoring), so a signal during start-up is a stop request too, not an exit 143. SIGINT is a
stop request like SIGTERM; a second SIGINT aborts at once (KeyboardInterrupt, nothing saved).
"""

from __future__ import annotations

import contextlib
import signal
import sys

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopRequest:
  """The process's one stop request, live inside ``handling()`` blocks."""

  def __init__(self):
    self.name: str | None = None  # the signal that asked to stop, once one did
    self._depth = 0
    self._previous: dict = {}
    self._forwarded = False

  def _install(self) -> None:
    """Handle SIGTERM and SIGINT (main thread only; elsewhere nothing is installed).

    SIGTERM is left alone once JAX's preemption service runs: its C++ handler must keep it, or
    the other hosts would never hear of the notice.
    """
    signals = [signal.SIGINT] + ([signal.SIGTERM] if _jax_sync_manager() is None else [])
    try:
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # not the main thread (an embedding application): leave its handlers
      pass

  def _uninstall(self) -> None:
    for sig, old in self._previous.items():
      signal.signal(sig, old if old is not None else signal.SIG_DFL)
    self._previous = {}
    self.name = None
    self._forwarded = False

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.name == "SIGINT":
      # A second Ctrl-C: the user does not want to wait for the save.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    if self.name is None:
      self.name = _NAMES.get(signum, str(signum))
      again = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
      print(f"xlingo: {self.name} received; stopping at the next step boundary{again}",
            file=sys.stderr, flush=True)
    self._forward_to_jax()

  def _forward_to_jax(self) -> None:
    """With several processes, hand a local request to JAX's preemption notifier as the SIGTERM
    it listens for, so every host learns of it and they agree on a step."""
    if self.name is not None and not self._forwarded and _jax_sync_manager() is not None:
      self._forwarded = True
      signal.raise_signal(signal.SIGTERM)

  def requested_locally(self) -> bool:
    """A stop was asked for in this process and this process alone decides (one process)."""
    return self.name is not None and _jax_sync_manager() is None

  def should_stop(self, step: int) -> bool:
    """Called after every training step with the step just completed; True on every host at
    the same step once a stop was requested anywhere. No device work either way."""
    manager = _jax_sync_manager()
    if manager is None:
      return self.name is not None
    self._forward_to_jax()  # a request that came before jax.distributed.initialize
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)

  @property
  def label(self) -> str:
    return self.name or "SIGTERM"


def _jax_sync_manager():
  """JAX's preemption sync manager when this process joined a distributed run, else None."""
  if "jax" not in sys.modules:  # nothing can have initialised jax.distributed yet
    return None
  from jax._src import distributed

  if distributed.global_state.client is None:
    return None
  return distributed.global_state.preemption_sync_manager


def check_multi_process_ready() -> None:
  """Several processes need JAX's preemption service to agree on a stop step; refuse to start
  without it rather than hang in a collective at the first preemption."""
  import jax

  from xlingo.errors import ConfigError

  if jax.process_count() > 1 and _jax_sync_manager() is None:
    raise ConfigError("this multi-process run has no JAX preemption service (it starts with "
                      "jax.distributed.initialize unless jax_enable_preemption_service is off); "
                      "turn it on so that hosts agree on the step to stop at")


REQUEST = StopRequest()


@contextlib.contextmanager
def handling():
  """Stop requests are caught inside the block (the outermost block installs the handlers and
  restores the previous ones after it, so a library caller's process is left as it was)."""
  if REQUEST._depth == 0:
    REQUEST._install()
  REQUEST._depth += 1
  try:
    yield REQUEST
  finally:
    REQUEST._depth -= 1
    if REQUEST._depth == 0:
      REQUEST._uninstall()
