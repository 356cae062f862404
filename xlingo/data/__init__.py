"""The data layer: text to sharded batches, by stage (see the modules' docstrings).

Importing it loads seqio and TensorFlow once, quietly: tensorflow_text's native libraries log
oneDNN and CUDA start-up lines through absl before any log level applies, which buried every
command's own output under 6-10 lines of noise. The C-level stderr is silenced for that import
only; a Python error raised by it still shows.
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _native_stderr_silenced():
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


with _native_stderr_silenced():
  import seqio  # noqa: F401,E402 - imported here once, quietly
  import tensorflow  # noqa: F401,E402
