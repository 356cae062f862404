"""The process's native streams: silencing C-level stderr around libraries that log to fd 2
(TensorFlow's start-up, the SentencePiece trainer). Shared by the command line and the data
tools, which may not import the CLI."""

from __future__ import annotations

import contextlib
import glob
import importlib.abc
import importlib.util
import os
import pkgutil
import sys


@contextlib.contextmanager
def native_stderr_silenced():
  """Silence the process's C-level stderr (fd 2) inside the block; Python errors still raise."""
  try:
    saved = os.dup(2)
  except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
    yield
    return
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


# Native libraries that log to fd 2 while they load, before any log level can apply:
# TensorFlow (oneDNN, "Could not find cuda drivers", CPU instruction notes) and tensorflow_text
# (its own copy of absl: "All log messages before absl::InitializeLog()").
QUIET_IMPORTS = ("tensorflow", "tensorflow_text")
# Environment variables TensorFlow's import sets for its own TPU runtime (TPU_SKIP_MDS_QUERY=1,
# TPU_LIBRARY_PATH, ...): on a TPU VM they would stop JAX's libtpu from reading the slice's
# workers from the metadata server, so they are taken back.
TF_TAKES_BACK = ("TPU_",)


# PCI vendor id of Google's TPU chips (what JAX's own hardware check reads in /sys).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _tpu_chip_present() -> bool:
  if glob.glob("/dev/accel*"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def skip_absent_tpu() -> None:
  """With libtpu installed on a machine that has no TPU chip and no GPU plugin, run JAX on CPU.

  libtpu comes with the test extra (TPU compiles without a TPU) and so with every
  ``./launch/local.sh`` environment. On a CPU machine JAX then still initialises its TPU
  backend at the first device query, and libtpu prints half a dozen warnings (no accelerator
  type, no worker hostnames, "Logging before InitGoogle()") that read as a crash. There is no
  chip to find, so JAX_PLATFORMS=cpu changes nothing but the noise; deviceless TPU compiles
  (bench/tpu_aot.py) work under it too. Left alone: a JAX_PLATFORMS the user set, a TPU VM,
  and an installed CUDA/ROCm plugin. Must run before jax is imported (it reads the variable
  then)."""
  if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
    return
  if importlib.util.find_spec("libtpu") is None or _tpu_chip_present():
    return
  if any(m.name.startswith(("jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules()):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"


def hide_tensorflow_start_up() -> None:
  """Make the first import of TensorFlow (and tensorflow_text) quiet, wherever it happens.

  xlingo imports TensorFlow only to feed its input pipeline (seqio, tf.data), from many
  modules, often at module import time, before a command has parsed its flags. Its native
  libraries print their start-up lines to fd 2 before any log level applies, and its first
  device query calls cuInit, which on a CPU machine logs "failed call to cuInit: CUDA error"
  and reads as a crash. So the one place that sees every first import is the import system: a
  finder, installed once by ``xlingo/__init__``, runs those imports with fd 2 silenced, then
  hides GPUs from TensorFlow (JAX owns the accelerator; TensorFlow would otherwise also take
  GPU memory on a GPU machine) and takes back the TPU variables the import set. A failed
  import still raises its Python error. The finder leaves ``sys.meta_path`` once both are done.
  """
  if not any(isinstance(f, _QuietImportFinder) for f in sys.meta_path):
    if not all(name in sys.modules for name in QUIET_IMPORTS):
      sys.meta_path.insert(0, _QuietImportFinder())


class _QuietImportFinder(importlib.abc.MetaPathFinder):
  """Finds QUIET_IMPORTS with the other finders and wraps their loaders in _QuietLoader."""

  def __init__(self):
    self._pending = {name for name in QUIET_IMPORTS if name not in sys.modules}

  def find_spec(self, name, path=None, target=None):
    if name not in self._pending:
      return None
    self._pending.discard(name)
    if not self._pending and self in sys.meta_path:
      sys.meta_path.remove(self)
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(name, path, target)
      if spec is not None:
        if spec.loader is not None:
          spec.loader = _QuietLoader(spec.loader)
        return spec
    return None


class _QuietLoader(importlib.abc.Loader):
  """Runs the wrapped loader with fd 2 silenced; anything else goes to the wrapped loader."""

  def __init__(self, loader):
    self._loader = loader

  def __getattr__(self, attr):
    return getattr(self._loader, attr)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    before = {k: v for k, v in os.environ.items() if k.startswith(TF_TAKES_BACK)}
    try:
      with native_stderr_silenced():
        self._loader.exec_module(module)
        if module.__name__ == "tensorflow":
          try:
            module.config.set_visible_devices([], "GPU")
          except RuntimeError:  # TensorFlow's devices were already set up
            pass
    finally:
      for k in [k for k in os.environ if k.startswith(TF_TAKES_BACK)]:
        if k not in before:
          del os.environ[k]
      os.environ.update(before)
