"""xlingo: cross-lingual language-model training in JAX/Flax, TPU first, CPU friendly."""

import os as _os

# One gs:// backend everywhere: etils.epath would pick TensorFlow's gfile whenever TensorFlow is
# installed (always, for xlingo), and gfile cannot reach a GCS emulator, so the backend the tests
# prove would not be the one production runs. With this set before any gs:// path is resolved,
# every file of xlingo's own (xlingo.paths) and Orbax's metadata go through gcsfs, in production
# and under the emulator alike; Orbax's arrays go through tensorstore.
_os.environ["EPATH_USE_TF"] = "false"
del _os

# TensorFlow (the input pipeline only) loads quietly, wherever it is first imported.
from xlingo import stdio as _stdio  # noqa: E402

_stdio.hide_tensorflow_start_up()
# No libtpu warnings on a machine without TPU chips (the test extra installs libtpu).
_stdio.skip_absent_tpu()
del _stdio

__version__ = "0.1.0"
