"""cli.exit_when_done: a command ends at once, yet nothing it left to do at exit is lost."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import atexit, sys, threading, time
from xlingo import cli

def main():
  def late():  # a non-daemon thread still writing when main returns (an Orbax save)
    time.sleep(0.3)
    open(sys.argv[1] + ".thread", "w").write("done")
  threading.Thread(target=late).start()
  atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").write("done"))
  sys.stdout.write("unflushed output")  # no newline, no flush: buffered when os._exit comes
  {end}

cli.exit_when_done(main)
"""


@pytest.mark.parametrize("end, code, err", [
    ("return None", 0, ""),
    ("sys.exit(3)", 3, ""),
    ("sys.exit('xlingo: error: bad')", 1, "xlingo: error: bad"),
])
def test_exit_when_done_keeps_threads_atexit_output_and_code(tmp_path, end, code, err):
  mark = str(tmp_path / "mark")
  p = subprocess.run([sys.executable, "-c", PROGRAM.replace("{end}", end), mark],
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "PYTHONPATH": ROOT})
  assert p.returncode == code, p.stderr
  assert p.stdout == "unflushed output"
  assert err in p.stderr
  assert open(mark + ".thread").read() == "done"
  assert open(mark + ".atexit").read() == "done"
