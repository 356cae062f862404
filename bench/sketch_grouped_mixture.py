"""Measurement sketch (not the pipeline): mixing GROUPS of examples instead of single examples.

  .venv/bin/python bench/sketch_grouped_mixture.py [--k 64] [--groups 16] [--tokenize_batch 2048]
      [--tokenizer sp|tf_text] [--tf_only]

Stand-alone tf.data over the embedded corpus's 9 train files (no seqio): per language
TextLineDataset -> repeat -> shuffle(1024 lines) -> batch(tokenize_batch) -> tokenize
(``sp``: SentencePieceProcessor.Encode in a tf.numpy_function, ``tf_text``: the seqio
vocabulary's encode_tf) -> split into groups of k examples (dense, padded) -> unbatch ->
shuffle(16 groups); ``sample_from_datasets`` over the 9 languages at p ~ n^(1/3.33) picks GROUPS;
``padded_batch(groups)`` crosses to NumPy, where the examples of those groups are permuted and
concat-packed into [8, 256] batches. Prints the raw batched EncodeAsIds rate (best of 2 s, as
bench_data.py) and the packed tokens/s, in one process. docs/PERFORMANCE.md, "Data pipeline".

Caveat found with it: a tf.data pipeline that calls Python (numpy_function) in its parallel map
can hang the interpreter's exit while the pipeline is running; this sketch ends with os._exit.
"""

import argparse
import itertools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from xlingo.data import vocab as xvocab  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=64, help="examples per group")
  ap.add_argument("--groups", type=int, default=16, help="groups per transfer to NumPy")
  ap.add_argument("--tokenize_batch", type=int, default=2048)
  ap.add_argument("--tokenizer", default="sp", choices=("sp", "tf_text"))
  ap.add_argument("--tf_only", action="store_true", help="also time tf.data alone")
  ap.add_argument("--seconds", type=float, default=8.0)
  a = ap.parse_args()
  k = a.k
  v = xvocab.load_vocab(xvocab.embedded_vocab_path())
  sp = v.tokenizer
  files = xvocab.embedded_files("train")
  lines = [ln.strip() for ps in files.values() for p in ps
           for ln in open(p, encoding="utf-8") if ln.strip()]
  best, t1 = 0.0, time.perf_counter()
  while time.perf_counter() - t1 < 2:
    t0 = time.perf_counter()
    n = sum(map(len, sp.EncodeAsIds(lines[:20000])))
    best = max(best, n / (time.perf_counter() - t0))

  def to_groups(lens, vals):
    n = len(lens)
    ng = -(-n // k)
    lp = np.zeros(ng * k, np.int32)
    lp[:n] = lens
    lp = lp.reshape(ng, k)
    gt = lp.sum(1)
    out = np.zeros((ng, int(gt.max()) if ng else 0), np.int32)
    gs = np.concatenate([[0], np.cumsum(gt)[:-1]])
    out[np.repeat(np.arange(ng), gt), np.arange(len(vals)) - np.repeat(gs, gt)] = vals
    return out, lp

  def enc_sp(x):
    ids = sp.Encode(x.tolist(), add_eos=True, num_threads=1)
    lens = np.fromiter(map(len, ids), np.int32, count=len(ids))
    vals = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lens.sum()))
    return to_groups(lens, vals)

  def task(lang, path):
    def fn(x):
      x = tf.boolean_mask(x, tf.strings.length(tf.strings.strip(x)) > 0)
      if a.tokenizer == "sp":
        vals, lens = tf.numpy_function(enc_sp, [x], [tf.int32, tf.int32], stateful=False)
      else:
        ids = tf.cast(v.encode_tf(x), tf.int32)
        ids = tf.concat([ids, tf.ones([ids.nrows(), 1], tf.int32)], axis=1)
        vals, lens = tf.numpy_function(
            lambda ln, vl: to_groups(ln, vl), [tf.cast(ids.row_lengths(), tf.int32), ids.values],
            [tf.int32, tf.int32], stateful=False)
      vals.set_shape([None, None])
      lens.set_shape([None, k])
      g = tf.shape(lens)[0]
      return {"values": vals, "lengths": lens, "lang": tf.fill([g, k], lang)}

    ds = tf.data.TextLineDataset(path).repeat().shuffle(1024, seed=0).batch(a.tokenize_batch)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return ds.shuffle(16, seed=0).prefetch(tf.data.AUTOTUNE)

  ns = {lang: sum(1 for _ in open(ps[0], encoding="utf-8")) for lang, ps in files.items()}
  r = {lang: n ** (1 / 3.33) for lang, n in ns.items()}
  rates = [r[lang] / sum(r.values()) for lang in files]
  mix = tf.data.Dataset.sample_from_datasets([task(lang, ps[0]) for lang, ps in files.items()],
                                             rates, seed=0, stop_on_empty_dataset=True)
  opts = tf.data.Options()
  opts.deterministic = True
  mix = mix.padded_batch(a.groups).prefetch(4).with_options(opts)
  if a.tf_only:
    it = iter(mix)
    for _ in range(20):
      next(it)
    t0, tok = time.perf_counter(), 0
    while time.perf_counter() - t0 < a.seconds:
      tok += int(next(it)["lengths"].numpy().sum())
    print(f"tf.data alone: {tok / (time.perf_counter() - t0):,.0f} tokens/s")
    del it
  table = {lang.encode(): i for i, lang in enumerate(files)}
  it = iter(mix)
  rng = np.random.default_rng(0)
  buf = [np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool)]
  B, L = 8, 256

  def refill():
    b = {key: val.numpy() for key, val in next(it).items()}
    lm = b["lengths"]
    vals = b["values"][np.arange(b["values"].shape[1]) < lm.sum(1)[:, None]]
    keep = lm.reshape(-1) > 0
    lens = lm.reshape(-1)[keep]
    ids = np.array([table[x] for x in b["lang"].reshape(-1)[keep]], np.int32)
    perm = rng.permutation(len(lens))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    pl = lens[perm]
    cs = np.concatenate([[0], np.cumsum(pl)[:-1]])
    idx = np.repeat(starts[perm] - cs, pl) + np.arange(pl.sum())
    st = np.zeros(len(vals), bool)
    st[cs] = True
    buf[0] = np.concatenate([buf[0], vals[idx]])
    buf[1] = np.concatenate([buf[1], np.repeat(ids[perm], pl)])
    buf[2] = np.concatenate([buf[2], st])

  def batch():
    n = B * L
    while len(buf[0]) < n:
      refill()
    t = buf[0][:n].reshape(B, L)
    st = buf[2][:n].reshape(B, L).copy()
    for i in range(3):
      buf[i] = buf[i][n:]
    st[:, 0] = True
    seg = np.cumsum(st, 1, dtype=np.int32)
    ar = np.arange(L, dtype=np.int32)
    pos = ar - np.maximum.accumulate(np.where(st, ar, 0), 1)
    inp = np.zeros_like(t)
    inp[:, 1:] = t[:, :-1]
    inp[st] = 0
    return {"targets": t, "inputs": inp, "segment_ids": seg, "positions": pos}

  for _ in range(50):
    batch()
  t0, tok = time.perf_counter(), 0
  while time.perf_counter() - t0 < a.seconds:
    tok += int(np.count_nonzero(batch()["segment_ids"]))
  rate = tok / (time.perf_counter() - t0)
  print(f"k={k} groups={a.groups} tokenizer={a.tokenizer}: raw {best:,.0f}  "
        f"grouped pipeline {rate:,.0f} tokens/s  ratio {rate / best:.1%}", flush=True)
  os._exit(0)


if __name__ == "__main__":
  main()
