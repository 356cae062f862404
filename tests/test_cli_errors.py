"""The command line's own errors: config files that do not load, bad overrides, --help, and no
start-up noise from TensorFlow before xlingo's own output. Every case is a real subprocess."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, module="xlingo.train"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the commands must be quiet on their own
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(p) -> str:
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  assert len(lines) == 1, p.stderr[-2000:]
  assert lines[0].startswith("xlingo: error: ")
  return lines[0]


def test_config_file_with_syntax_error_is_one_line_with_file_and_line(tmp_path):
  cfg = tmp_path / "broken.py"
  cfg.write_text("from xlingo import config as xconfig\n\ndef get_config(arg=None)\n"
                 "  return xconfig.base_config()\n")
  line = _one_error_line(_run("--config", str(cfg), "--workdir", str(tmp_path / "w")))
  assert f"{cfg} line 3" in line and "syntax" in line
  assert not (tmp_path / "w").exists()


def test_config_file_that_raises_names_its_line(tmp_path):
  cfg = tmp_path / "raises.py"
  cfg.write_text("from xlingo import config as xconfig\n\ndef get_config(arg=None):\n"
                 "  c = xconfig.base_config()\n  c.model.no_such_section.x = 1\n  return c\n")
  line = _one_error_line(_run("--config", str(cfg), "--workdir", str(tmp_path / "w")))
  assert f"{cfg} line 5" in line and "AttributeError" in line


def test_unknown_override_names_the_key(tmp_path):
  line = _one_error_line(_run("--config", "configs/tiny.py", "--config.train.stepz=3",
                              "--workdir", str(tmp_path / "w")))
  assert "unknown config key 'train.stepz'" in line


def test_config_argument_error_from_get_config_is_its_own_line(tmp_path):
  line = _one_error_line(_run("--config", "configs/distill_small.py:nope",
                              "--workdir", str(tmp_path / "w")))
  assert line == ("xlingo: error: configs/distill_small.py:nope: use no argument, 'teacher' or "
                  "'student'")


def test_help_lists_every_flag_with_its_default():
  p = _run("--help", module="xlingo.generate")
  assert p.returncode == 0, p.stderr
  assert "--max_len: New tokens per sample at most. (default: 64)" in p.stdout
  assert "--workdir:" in p.stdout and "--config:" in p.stdout


def test_no_tensorflow_start_up_noise_before_our_error(tmp_path):
  # steps=0 is refused after the data layer (seqio, TensorFlow) has been imported.
  line = _one_error_line(_run("--config", "configs/tiny.py", "--config.train.steps=0",
                              "--workdir", str(tmp_path / "w")))
  assert "train.steps=0" in line


def test_tensorflow_import_leaves_the_tpu_variables_as_they_were():
  """TensorFlow's import sets TPU_SKIP_MDS_QUERY=1, TPU_LIBRARY_PATH and more for its own
  runtime; left in place they stop libtpu from finding a TPU VM's workers (and made CPU runs with
  libtpu installed open with its warnings). The CLI takes them back."""
  code = ("import os\n"
          "os.environ['TPU_NAME'] = 'mine'\n"
          "import jax\n"
          "jax.devices()\n"  # what JAX's own start sets (libtpu's path) stays
          "before = dict(os.environ)\n"
          "from xlingo import cli\n"
          "cli.import_tensorflow_quietly()\n"
          "import tensorflow\n"
          "print(sorted(k for k in os.environ if k.startswith('TPU_') and os.environ[k] != "
          "before.get(k)), os.environ['TPU_NAME'])\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env["PYTHONPATH"] = ROOT
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["[]", "mine"], p.stdout


def test_a_machine_without_accelerators_starts_jax_without_libtpu_noise():
  """With libtpu installed (the test extra) and no TPU, libtpu's start printed five lines about
  unknown TPU workers before every command's output. (Only while no other process holds
  libtpu's lock file does libtpu get that far, so under a parallel test run this may pass
  either way.)"""
  from xlingo import cli

  if any(__import__("glob").glob(p) for p in cli.ACCELERATOR_FILES):
    pytest.skip("this machine has an accelerator")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS"))}
  env["PYTHONPATH"] = ROOT
  code = "from xlingo import cli\ncli.import_tensorflow_quietly()\nimport jax\nprint(jax.devices())"
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "CpuDevice" in p.stdout
  assert "TPU" not in p.stderr, p.stderr[-2000:]


def test_tensorflow_input_pipeline_starts_without_cuda_noise():
  """evaluate, adapt and distill printed "failed call to cuInit" on a CPU machine: TensorFlow's
  first op looked for GPUs after its quiet import. It only feeds the input pipeline, so the
  CLI hides GPUs from it."""
  # As the tools start: JAX first (maybe_initialize_distributed), then TensorFlow.
  _runs_quietly("from xlingo import cli\ncli.maybe_initialize_distributed()\n"
                "cli.import_tensorflow_quietly()\nimport tensorflow as tf\n"
                "print(list(tf.data.Dataset.from_tensor_slices(['a', 'b']).as_numpy_iterator()))\n"
                "print(tf.config.get_visible_devices('GPU'))",
                ["[b'a', b'b']", "[]"], drop_tpu_env=False)


def _runs_quietly(code: str, first_lines: list[str], drop_tpu_env: bool) -> None:
  """Runs ``code`` in a fresh interpreter without the suite's quieting variables: it prints
  ``first_lines`` and nothing at all reaches stderr."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS")
         and not (drop_tpu_env and k.startswith("TPU_"))}
  env["PYTHONPATH"] = ROOT
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split("\n")[:len(first_lines)] == first_lines, p.stdout
  assert "cuInit" not in p.stderr and not p.stderr.strip(), p.stderr[-2000:]


def test_tensorflow_imported_by_a_module_at_import_time_stays_quiet():
  """The entry points import the data layer (seqio, TensorFlow) at module import time, before
  the CLI's start-up: its start-up lines, libtpu's and the first op's cuInit line still must not
  reach stderr (xlingo.stdio.hide_tensorflow_start_up)."""
  _runs_quietly("import xlingo.data.iterator\nimport tensorflow as tf\nimport jax\n"
                "print(jax.devices()[0].platform, tf.config.get_visible_devices('GPU'))\n"
                "print(list(tf.data.Dataset.range(2).as_numpy_iterator()))",
                ["cpu []", "[np.int64(0), np.int64(1)]"], drop_tpu_env=True)
