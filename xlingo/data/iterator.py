"""Packed batches for this process: read ahead, save and restore, shard over hosts.

:class:`PackedIterator` drives a reader (readers.py) and a packer (packing.py): pieces of the
token stream are packed into [batch, seq_len] batches as they arrive. Iteration is
deterministic for a seed, and the iterator saves and restores its state (the tf.data iterator
checkpoint, the reader's counters and the tokens read but not yet placed), so a restored run
sees exactly the batches an uninterrupted one would. The state is written through the path
layer (a ``gs://`` directory works): tf.data writes its checkpoint to a local temporary
directory, which is copied there (and copied back down to restore).

Each process reads its own share of the data where the sources can be split
(:func:`reads_its_share`: line files, at least one per process; TFDS splits, by file or by
an even slice of their examples) and packs its rows of the global batch; :func:`to_global`
assembles the global jax.Arrays.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import io
import json
import logging
import tempfile
import threading
import weakref

import numpy as np
import seqio
import tensorflow as tf

from xlingo import paths
from xlingo.data import packing as packing_lib
from xlingo.data import tasks
from xlingo.errors import DataError


class _Background:
  """Reads ahead in ``workers`` threads, at most ``depth`` pieces ahead, in order.

  A read is a ``reader.fetch()`` (tf.data, in order, under ``read_lock``) then a
  ``reader.process()`` (parsing, SentencePiece, NumPy; in parallel). SentencePiece and
  tf.data release the GIL, so tokenizing overlaps the packing and the next fetch. A state
  saved under ``read_lock`` after :meth:`take_buffered` has every fetched piece in hand.
  """

  def __init__(self, reader, workers: int = 2, depth: int = 3):
    self.reader = reader
    self.workers = workers
    self.depth = depth
    self.read_lock = threading.Lock()
    self.cv = threading.Condition()
    self.threads: list[threading.Thread] = []
    self._reset()
    _LIVE.add(self)

  def _reset(self):
    self.results: dict[int, tuple] = {}
    self.issued = 0  # reads fetched
    self.next = 0  # the next read the consumer takes
    self.inflight = 0
    self.end: int | None = None  # read number at which the stream ended
    self.error: BaseException | None = None
    self.stop = False

  def _run(self):
    while True:
      with self.cv:
        while self.issued - self.next >= self.depth and not self.stop:
          self.cv.wait()
      with self.read_lock:
        if self.stop or self.end is not None or self.error is not None:
          return
        try:
          raw = self.reader.fetch()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
          return self._fail(e)
        with self.cv:
          if raw is None:
            self.end = self.issued
            self.cv.notify_all()
            return
          seq = self.issued
          self.issued += 1
          self.inflight += 1
      try:
        piece = self.reader.process(raw)
      except BaseException as e:  # noqa: BLE001
        return self._fail(e)
      with self.cv:
        self.results[seq] = piece
        self.inflight -= 1
        self.cv.notify_all()

  def _fail(self, e: BaseException):
    with self.cv:
      self.error = e
      self.inflight = 0
      self.cv.notify_all()

  def get(self):
    """The next piece, or None at the end of a finite stream."""
    if not self.threads:
      self.threads = [threading.Thread(target=self._run, daemon=True, name=f"xlingo-input-{i}")
                      for i in range(self.workers)]
      for t in self.threads:
        t.start()
    with self.cv:
      while (self.next not in self.results and self.error is None
             and (self.end is None or self.next < self.end)):
        self.cv.wait()
      if self.next in self.results:
        piece = self.results.pop(self.next)
        self.next += 1
        self.cv.notify_all()
        return piece
      if self.error is not None:
        raise self.error
      return None

  def take_buffered(self) -> list:
    """Every piece fetched but not yet taken, in order (call with ``read_lock`` held)."""
    with self.cv:
      while self.inflight and self.error is None:
        self.cv.wait()
      if self.error is not None:
        raise self.error
      out = [self.results.pop(i) for i in range(self.next, self.issued)]
      self.next = self.issued
      self.cv.notify_all()
      return out

  def request_stop(self) -> None:
    """Ask the threads to end after their current read (does not wait)."""
    with self.cv:
      self.stop = True
      self.cv.notify_all()

  def halt(self) -> None:
    """Stop the threads (after their current read); pieces not taken are dropped."""
    self.request_stop()
    for t in self.threads:
      if t is not threading.current_thread():
        t.join()
    self.threads = []
    self._reset()


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _halt_all():
  # A daemon thread inside a tf.data call while the interpreter shuts down can crash it.
  for bg in list(_LIVE):
    bg.halt()


class Wrapped:
  """A batch iterator built on another (``inner``) that changes only what ``__next__`` yields:
  the batch count, the token counters and the saved state are the inner iterator's."""

  def __init__(self, inner):
    self.inner = inner

  def __iter__(self):
    return self

  @property
  def batches(self) -> int:
    return self.inner.batches

  @property
  def counters(self) -> dict:
    """The inner iterator's saved counters (tokens per language: the loop's TokenCounter)."""
    return self.inner.counters

  @counters.setter
  def counters(self, value: dict) -> None:
    self.inner.counters = value

  def save(self, directory: str) -> None:
    self.inner.save(directory)

  def restore(self, directory: str) -> None:
    self.inner.restore(directory)


class PackedIterator:
  """Iterates packed [batch, seq_len] batches from a reader; its state can be saved.

  ``reader`` is a ``readers.ExampleReader`` or ``readers.GroupReader``; ``packing`` is
  ``"concat"`` or ``"first_fit"`` (packing.py). With ``background``, reads run ahead in
  a thread (:class:`_Background`). A saved state holds the reader's tf.data iterator
  (positioned after the last read), its counters and the token stream not yet placed in a
  batch (read-ahead pieces included), so a restored iterator continues exactly.
  """

  def __init__(self, reader, batch_size: int, seq_len: int, packing: str = "first_fit",
               background: bool = False):
    packing_lib.check_packing(packing)
    self.packing = packing
    self.reader = reader
    self.batch_size = batch_size
    self.seq_len = seq_len
    # A reader without a vocabulary (a test's) packs with SentencePiece's start id.
    self.stream = packing_lib.TokenStream(getattr(reader, "start_id", 0))
    self.ready: collections.deque = collections.deque()  # packed, not yet returned
    self.batches = 0
    # JSON values saved and restored with the state: what the consumer counts of the batches
    # taken so far (the loop's cumulative tokens per language), so that a restored run goes on
    # counting from where the saved one was.
    self.counters: dict = {}
    self._bg = _Background(reader) if background else None

  def __iter__(self):
    return self

  def __del__(self):
    bg = getattr(self, "_bg", None)
    if bg is not None:
      bg.request_stop()

  def __next__(self) -> dict[str, np.ndarray]:
    read = self.reader.read if self._bg is None else self._bg.get
    pack = packing_lib.PACKERS[self.packing]
    while not self.ready:
      piece = read()
      if piece is None:  # the end of a finite stream: its rest makes the last batch
        self.ready.extend(pack(self.stream, self.batch_size, self.seq_len, final=True))
        if not self.ready:
          raise StopIteration
        break
      self.stream.add(*piece)
      self.ready.extend(pack(self.stream, self.batch_size, self.seq_len))
    self.batches += 1
    return self.ready.popleft()

  # --- state ---------------------------------------------------------------------------------
  def save(self, directory: str) -> None:
    """Write this process's iterator state into ``directory`` (created if needed)."""
    lock = self._bg.read_lock if self._bg is not None else contextlib.nullcontext()
    with lock:
      if self._bg is not None:
        for piece in self._bg.take_buffered():
          self.stream.add(*piece)
      self._save(directory)

  def _save(self, directory: str) -> None:
    paths.makedirs(directory)
    # tf.data writes its checkpoint through tf.io.gfile, which cannot reach every store the
    # path layer can (a GCS emulator): write it locally, copy it through the path layer.
    with tempfile.TemporaryDirectory(prefix="xlingo-tf-iterator-") as tmp:
      tf.train.Checkpoint(iterator=self.reader.iterator).write(paths.join(tmp, TF_ITERATOR))
      for name in paths.listdir(tmp):
        paths.copy_file(paths.join(tmp, name), paths.join(directory, name))
    ready = {f"ready_{k}": np.stack([b[k] for b in self.ready]) for k in packing_lib.FEATURES
             if self.ready}
    buf = io.BytesIO()
    np.savez(buf, **{f: getattr(self.stream, f) for f in packing_lib.TokenStream.FIELDS},
             **ready, **{f"reader_{k}": v for k, v in self.reader.state_arrays().items()})
    paths.write_bytes(paths.join(directory, "stream.npz"), buf.getvalue())
    # state.json last: a directory with it holds a whole state
    paths.write_text(paths.join(directory, "state.json"), json.dumps(
        {"format": 2, "batches": self.batches, "packing": self.packing,
         "reader": self.reader.kind, "counters": self.counters, **self.reader.state()}))

  def restore(self, directory: str) -> None:
    state = json.loads(paths.read_text(paths.join(directory, "state.json")))
    saved_kind = state.get("reader", "examples")
    if saved_kind != self.reader.kind:
      raise DataError(
          f"data state in {directory} was saved by another input pipeline ({saved_kind}) than "
          f"this run's ({self.reader.kind}); resume with {_flags(saved_kind)}")
    self.reader.check_state(state, directory)
    if self._bg is not None:
      self._bg.halt()
    _read_tf_iterator(self.reader.iterator, directory)
    self.stream.clear()
    self.ready.clear()
    if state.get("format", 1) >= 2:
      with _load_npz(paths.join(directory, "stream.npz")) as z:
        self.stream.add(*(z[f] for f in packing_lib.TokenStream.FIELDS[:4]),
                        self._raw_bytes(z, "raw_bytes", z["tokens"]),
                        z["sourced"] if "sourced" in z else None)
        if "ready_targets" in z:
          cols = {k: z[f"ready_{k}"] for k in packing_lib.FEATURES if f"ready_{k}" in z}
          if "raw_bytes" not in cols:
            cols["raw_bytes"] = self._raw_bytes(z, "", cols["targets"]) * (
                cols["segment_ids"] > 0)
          self.ready.extend({k: cols[k][i] for k in packing_lib.FEATURES}
                            for i in range(cols["targets"].shape[0]))
        self.reader.load_state_arrays({k[len("reader_"):]: z[k] for k in z.files
                                       if k.startswith("reader_")})
    else:
      tokens, lang_ids, weights, starts = _v1_stream(directory, state["pending"])
      self.stream.add(tokens, lang_ids, weights, starts, self.reader.piece_bytes[tokens])
    saved = state.get("packing", "first_fit")
    if saved != self.packing:
      # Nothing read is lost, but the batches differ from an uninterrupted run's from here on.
      logging.warning("data state in %s was saved with data.packing=%r, this run packs %r; "
                      "its %d packed batches come first, then its unplaced tokens are "
                      "repacked", directory, saved, self.packing, len(self.ready))
    self.reader.load_state(state)
    self.batches = state["batches"]
    self.counters = dict(state.get("counters", {}))

  def _raw_bytes(self, z, key: str, tokens: np.ndarray) -> np.ndarray:
    """``z[key]``, or for a state saved before raw byte counts its tokens' normalised bytes
    (what bits per byte counted then)."""
    return z[key] if key in z else self.reader.piece_bytes[tokens]


TF_ITERATOR = "tf_iterator"  # the tf.data checkpoint's prefix (.index, .data-* files)


def _read_tf_iterator(iterator, directory: str) -> None:
  """Restore a tf.data iterator from the checkpoint in ``directory`` (copied down first)."""
  with tempfile.TemporaryDirectory(prefix="xlingo-tf-iterator-") as tmp:
    for name in paths.listdir(directory):
      if name.startswith(TF_ITERATOR + "."):
        paths.copy_file(paths.join(directory, name), paths.join(tmp, name))
    try:
      tf.train.Checkpoint(iterator=iterator).read(paths.join(tmp, TF_ITERATOR)).assert_consumed()
    except tf.errors.OpError as e:
      # A state of another tf.data graph (another data config or xlingo version) is a
      # mismatch, said in one line; unreadable bytes stay what they are (a damaged checkpoint).
      if "Failed to restore dataset iterator" not in str(e):
        raise
      raise DataError(f"data state in {directory} was written by another input pipeline than "
                      "this run's (another data config, or an xlingo version that tokenized "
                      "per-example tasks in tf.data); resume with the config and version that "
                      "wrote it") from None


def _load_npz(path: str):
  return np.load(io.BytesIO(paths.read_bytes(path)))


def _flags(kind: str) -> str:
  """The config overrides that select the reader of kind ``kind``."""
  if kind.startswith("text_groups:"):
    return ("the xlingo version that wrote it (its groups came from a seqio mixture; they are "
            "now taken on the host)")
  if not kind.startswith("groups:"):
    return "--config.data.group_size=0"
  k, _, per_read = kind.split(":")[1].partition("/")
  return f"--config.data.group_size={k} --config.data.examples_per_read={per_read}"


def _v1_stream(directory: str, pending: int) -> list[np.ndarray]:
  """The unplaced tokens of a state written before the token stream (first-fit chunks, or
  the concat packer's arrays) as one stream."""
  with _load_npz(paths.join(directory, "pending.npz")) as z:
    if pending:
      parts = [[z[f"{k}_{i}"] for i in range(pending)] for k in ("tokens", "lang_ids", "weights")]
      starts = [np.arange(len(t)) == 0 for t in parts[0]]
      return [np.concatenate(p) for p in parts] + [np.concatenate(starts)]
    return [z[f"concat_{k}"] for k in ("tokens", "lang_ids", "weights", "starts")]


def shard_info() -> seqio.ShardInfo | None:
  import jax  # the data layer needs jax only for the process topology

  n = jax.process_count()
  return seqio.ShardInfo(index=jax.process_index(), num_shards=n) if n > 1 else None


def mixture_dataset(mixture_or_task: str, *, split: str, seed: int, shuffle: bool,
                    repeat: bool, shard: seqio.ShardInfo | None) -> tf.data.Dataset:
  """The mixed stream of this process: raw examples, or groups of them from grouped tasks.

  Elements carry ``targets`` (a line, or a vector of lines) and tasks.PASSTHROUGH_FEATURES.
  ``shard``: this process's share when :func:`reads_its_share`; else every process reads
  everything and keeps every n-th element.
  """
  provider = seqio.get_mixture_or_task(mixture_or_task)
  kwargs = dict(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                num_epochs=None if repeat else 1, trim_output_features=False,
                try_in_mem_cache=False)
  passthrough = tasks.PASSTHROUGH_FEATURES
  if isinstance(provider, seqio.Mixture):
    kwargs["passthrough_features"] = list(passthrough)
  own_share = shard is None or reads_its_share(provider, split, shard.num_shards)
  ds = provider.get_dataset(shard_info=shard if own_share else None, **kwargs)
  if shard is not None and not own_share:
    logging.warning(
        "%s: fewer input files than the %d processes; every process reads all files and keeps "
        "every %d-th element. Split each language's files into >= %d shards to read less.",
        mixture_or_task, shard.num_shards, shard.num_shards, shard.num_shards)
    ds = ds.shard(shard.num_shards, shard.index)
  keep = ("targets",) + tuple(passthrough)
  if set(ds.element_spec) != set(keep):  # (a mixture's output is these already)
    ds = ds.map(lambda ex: {k: ex[k] for k in keep}, num_parallel_calls=tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  # Fusing seqio's chain of per-example maps (and the filter) cuts tf.data's per-element cost:
  # about +20% examples/s on 2 CPU cores (docs/PERFORMANCE.md, "Data pipeline").
  opts.experimental_optimization.map_fusion = True
  opts.experimental_optimization.map_and_filter_fusion = True
  return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)


def first_bytes(ds: tf.data.Dataset, limit: int) -> tf.data.Dataset:
  """The leading elements of ``ds`` whose ``targets`` (one line each) add up to at most
  ``limit`` bytes: whole lines only, so the text is the same whatever the tokenizer."""

  def count(total, ex):
    total += tf.cast(tf.strings.length(ex["targets"], unit="BYTE"), tf.int64)
    return total, (ex, total <= limit)

  return (ds.scan(tf.constant(0, tf.int64), count).take_while(lambda ex, keep: keep)
          .map(lambda ex, keep: ex))


def reads_its_share(provider, split: str, n: int) -> bool:
  """Whether each of ``n`` processes can read only its share of every task of ``provider``:
  line files when a task has at least ``n`` of them (each process reads whole files), TFDS
  splits always (tasks.TfdsSource: by file, or an even slice of the examples)."""
  task_list = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for t in task_list:
    src = t.source
    if isinstance(src, tasks.TfdsSource):
      continue
    if not isinstance(src, seqio.FileDataSource) or len(src.list_shards(split)) < n:
      return False
  return True


def to_global(batch: dict[str, np.ndarray], sharding) -> dict:
  """Per-process batch → global jax.Arrays sharded over the mesh's batch axes."""
  import jax

  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
