"""Line files in a global permutation per epoch (xlingo/data/lineindex.py): a uniform sample
from the first lines read, a new order each epoch, exact resume, re-indexing a changed file."""

import json
import logging
import os

import numpy as np
import pytest

from configs import tiny
from xlingo import paths
from xlingo.data import inputs, lineindex
from xlingo.errors import DataError

N = 2000


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(paths, "cache_dir", lambda: str(tmp_path / "cache"))
  lineindex._MEMO.clear()
  yield
  lineindex._MEMO.clear()


def _numbered(path, n=N, blank_every=97):
  """Lines "line i" (one ending "\\r\\n", the last without "\\n") with blank lines between."""
  parts = []
  for i in range(n):
    parts.append(f"line {i}" + ("\r\n" if i == 5 else "\n"))
    if i % blank_every == 0:
      parts.append("   \n")
  path.write_bytes("".join(parts).rstrip("\n").encode())
  return path


def _take(stream, groups):
  return [int(x.split()[1]) for _ in range(groups) for x in stream.group()]


def test_first_lines_read_are_a_sample_of_the_whole_file(tmp_path):
  s = lineindex.PermutedLines([str(_numbered(tmp_path / "a.txt"))], 8, seed=0, stream_salt=1)
  assert s.n == N  # blank lines are not examples
  head = _take(s, N // 10 // 8)  # the first 10%
  deciles = np.bincount(np.array(head) * 10 // N, minlength=10)
  assert deciles.min() >= 8, deciles  # ~20 each; file order would put all 200 in the first
  rest = _take(s, (N - len(head)) // 8)
  assert sorted(head + rest) == list(range(N))  # one epoch: every line once
  assert s.epoch == 1 and s.pos == 0
  ix = lineindex.line_index(str(tmp_path / "a.txt"))
  assert ix.crlf and len(ix) == N


def test_epochs_differ_seeds_differ_and_resume_mid_epoch_is_exact(tmp_path):
  path = str(_numbered(tmp_path / "a.txt"))
  a = lineindex.PermutedLines([path], 8, seed=0, stream_salt=1)
  first, second = _take(a, N // 8), _take(a, N // 8)
  assert sorted(second) == list(range(N)) and first != second
  other = lineindex.PermutedLines([path], 8, seed=1, stream_salt=1)
  assert _take(other, 10) != first[:80]

  kept = str(tmp_path / "indexes")  # data.line_index_dir
  lineindex.PermutedLines([path], 8, seed=0, stream_salt=1, index_dir=kept)
  lineindex._MEMO.clear()  # another process: the index comes from the sidecar
  b = lineindex.PermutedLines([path], 8, seed=0, stream_salt=1, index_dir=kept)
  assert len(os.listdir(kept)) == 1
  assert _take(b, 37) == first[:37 * 8]
  state = json.loads(json.dumps(b.state()))  # mid-epoch, through JSON as saved
  want = _take(b, 300)  # runs into the next epoch
  c = lineindex.PermutedLines([path], 8, seed=0, stream_salt=1)
  c.load_state(state)
  assert _take(c, 300) == want == (first + second)[37 * 8:337 * 8]


def test_a_changed_file_is_reindexed_never_read_stale(tmp_path, caplog):
  path = tmp_path / "a.txt"
  path.write_text("".join(f"old {i}\n" for i in range(100)))
  s = lineindex.PermutedLines([str(path)], 4, seed=0, stream_salt=1)  # indexed, nothing read
  st = os.stat(path)
  # Same size, same modification time, other line ends: only the read itself can tell.
  path.write_text("".join(f"new {i:0{len(str(i)) + 1}d}\n" for i in range(86)).ljust(st.st_size,
                                                                                      "x"))
  assert os.path.getsize(path) == st.st_size
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  new_lines = set(path.read_bytes().split(b"\n"))
  with caplog.at_level(logging.WARNING):
    got = [x for _ in range(30) for x in s.group()]
  assert set(got) <= new_lines and not any(x.startswith(b"old") for x in got)
  assert "changed since its line index was built" in caplog.text
  # A new size and time: re-indexed when the index is next asked for, with the message.
  caplog.clear()
  path.write_text("a\nb\n")
  os.utime(path, (st.st_atime + 10, st.st_mtime + 10))
  with caplog.at_level(logging.WARNING):
    ix = lineindex.line_index(str(path))
  assert len(ix) == 2 and "re-indexed" in caplog.text and "2 lines" in caplog.text


def test_a_bucket_file_reads_as_the_local_one(tmp_path, gcs_emulator):
  local = _numbered(tmp_path / "a.txt", n=300)
  remote = f"gs://{gcs_emulator.bucket('lines')}/a.txt"
  paths.write_bytes(remote, local.read_bytes())
  a = lineindex.PermutedLines([remote], 8, seed=0, stream_salt=1)
  b = lineindex.PermutedLines([str(local)], 8, seed=0, stream_salt=1)
  assert _take(a, 60) == _take(b, 60)
  assert not lineindex.line_index(remote).local.startswith("gs:")


def test_a_state_of_the_block_shuffled_pipeline_is_refused(tmp_path):
  cfg = tiny.get_config()
  plan = inputs.plan_inputs(cfg)
  it = inputs.train_iterator(plan, cfg)
  next(it)
  it.save(str(tmp_path / "state"))
  state = json.loads((tmp_path / "state" / "state.json").read_text())
  assert len(state["line_streams"]) == len(plan.stats)
  del state["line_streams"]
  (tmp_path / "state" / "state.json").write_text(json.dumps(state))
  with pytest.raises(DataError, match="shuffled line files within blocks"):
    inputs.train_iterator(plan, cfg).restore(str(tmp_path / "state"))
