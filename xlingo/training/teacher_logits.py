"""Offline teacher logits: the teacher's top-k over the student's training stream, stored once.

``python -m xlingo.distill dump`` writes, for each training step of the student's data stream,
the batch's ``inputs`` (to check that reader and writer see the same batches) and the teacher's
top-k token ids (int32) and log-probabilities (float32, log-softmax over the whole vocabulary at
temperature 1) into

  TEACHER_OUT/manifest.json             teacher, tokenizer, data plan, k, steps per shard
  TEACHER_OUT/shard_<first step>.npz    inputs [S, B, T], ids [S, B, T, k], logp [S, B, T, k]

(S steps per shard, about SHARD_BYTES each; 4 + 8k bytes per token, uncompressed).

Log-probabilities at temperature 1 serve every temperature: ``log_softmax`` over the k of
``logp / tau`` equals that of ``logits / tau`` (the normaliser is a constant shift), so the
loss is the online top-k KL (``losses.kl_divergence``). float32 rather than float16 keeps that
equality to float tolerance (float16 has a step of 0.016 at a log-probability of -20).

``distill.teacher_logits=TEACHER_OUT`` reads them back (:class:`WithTeacherLogits`): the shard
of a batch is found from the data iterator's batch count, which the checkpoint restores, so a
resumed run reads on from the same step.
"""

from __future__ import annotations

import io
import json

import numpy as np

from xlingo import paths
from xlingo.data import iterator, vocab_facts
from xlingo.errors import ConfigError, DataError
from xlingo.training.terms import StoredDistillation

MANIFEST = "manifest.json"
IDS, LOGP = StoredDistillation.IDS, StoredDistillation.LOGP  # the batch features the loss reads
FORMAT = 1
# The reader holds one shard in memory at a time: about this many bytes.
SHARD_BYTES = 256 << 20


def shard_name(first_step: int) -> str:
  return f"shard_{first_step:08d}.npz"


def bytes_per_token(k: int) -> int:
  """Disk per trained token: the input token, k int32 ids and k float32 log-probabilities."""
  return 4 + 8 * k


def steps_per_shard(config, k: int) -> int:
  step = config.train.batch_size * config.data.seq_len * bytes_per_token(k)
  return max(1, SHARD_BYTES // step)


def data_plan(config) -> dict:
  """What fixes the student's batches: the data section, the batch size and the row length."""
  return {"data": json.loads(config.data.to_json()), "batch_size": int(config.train.batch_size)}


def manifest(config, k: int, steps_per_shard: int, teacher: dict) -> dict:
  vocab, sha1 = vocab_facts.configured(config.data)
  return {"format": FORMAT, "k": int(k), "steps": int(config.train.steps),
          "steps_per_shard": int(steps_per_shard), "logp_dtype": "float32",
          "teacher": teacher, "tokenizer": {"vocab": vocab, "sha1": sha1},
          "plan": data_plan(config)}


def read_manifest(out_dir: str) -> dict:
  path = paths.join(out_dir, MANIFEST)
  if not paths.isfile(path):
    raise ConfigError(f"distill.teacher_logits={out_dir} has no {MANIFEST}; write it with "
                      "python -m xlingo.distill dump --config ... --workdir " + out_dir)
  return json.loads(paths.read_text(path))


def check_matches(config, man: dict, out_dir: str) -> None:
  """One line when the dump was made for another tokenizer, data plan, k or a shorter run."""
  _, sha1 = vocab_facts.configured(config.data)
  where = f"distill.teacher_logits={out_dir}"
  if man["tokenizer"]["sha1"] != sha1:
    raise ConfigError(f"{where} was dumped with the vocabulary {man['tokenizer']['vocab']} "
                      f"(SHA-1 {str(man['tokenizer']['sha1'])[:12]}), not this run's "
                      f"({str(sha1)[:12]}); dump again with this data.vocab_path")
  want, got = man["plan"], data_plan(config)
  diff = [(f"data.{k}", want["data"].get(k), got["data"].get(k))
          for k in sorted(set(want["data"]) | set(got["data"]))
          if want["data"].get(k) != got["data"].get(k)]
  if want["batch_size"] != got["batch_size"]:
    diff.append(("train.batch_size", want["batch_size"], got["batch_size"]))
  if diff:
    raise ConfigError(f"{where} was dumped for another data plan ("
                      + ", ".join(f"{k}: dumped {a!r} vs {b!r}" for k, a, b in diff)
                      + "); dump again with this config")
  k = int(config.distill.top_k)
  if k and k != man["k"]:
    raise ConfigError(f"{where} holds the teacher's top-{man['k']}, not distill.top_k={k}; set "
                      f"--config.distill.top_k={man['k']} (or 0) or dump again")
  if config.train.steps > man["steps"]:
    raise ConfigError(f"{where} covers {man['steps']} steps, train.steps={config.train.steps}; "
                      f"lower train.steps or dump again with --config.train.steps="
                      f"{config.train.steps}")


def write_shard(out_dir: str, first_step: int, arrays: dict) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_bytes(paths.join(out_dir, shard_name(first_step)), buf.getvalue())


def read_shard(out_dir: str, first_step: int, steps: int) -> dict:
  """A shard's arrays, whole; one line naming the file when it is missing or cut short."""
  path = paths.join(out_dir, shard_name(first_step))
  if not paths.isfile(path):
    raise DataError(f"teacher logits shard {path} is missing; dump again into {out_dir}")
  try:
    with np.load(io.BytesIO(paths.read_bytes(path))) as z:
      out = {k: z[k] for k in ("inputs", IDS, LOGP)}
  except Exception as e:  # noqa: BLE001 - a cut zip fails in zipfile, numpy or zlib
    raise DataError(f"teacher logits shard {path} is unreadable (truncated?): "
                    f"{type(e).__name__}: {e}; dump again into {out_dir}") from None
  if any(len(v) != steps for v in out.values()):
    raise DataError(f"teacher logits shard {path} holds {len(out['inputs'])} steps, not {steps}; "
                    f"dump again into {out_dir}")
  return out


class WithTeacherLogits(iterator.Wrapped):
  """The LM iterator with the stored teacher top-k of each batch added (``IDS``, ``LOGP``)."""

  def __init__(self, lm, out_dir: str, man: dict):
    super().__init__(lm)
    self.out_dir, self.man = out_dir, man
    self.summary = getattr(lm, "summary", "")
    self.replicated = bool(getattr(lm, "replicated", False))
    self._shard, self._first = None, -1

  def __next__(self) -> dict:
    step = self.inner.batches  # batches delivered so far: restored with the checkpoint
    batch = dict(next(self.inner))
    per, total = self.man["steps_per_shard"], self.man["steps"]
    first = step - step % per
    if first != self._first:
      self._shard = read_shard(self.out_dir, first, min(per, total - first))
      self._first = first
    i = step - first
    if not np.array_equal(self._shard["inputs"][i], np.asarray(batch["inputs"])):
      raise DataError(f"teacher logits in {self.out_dir} at step {step} were computed on other "
                      "tokens than this batch; dump again with this config")
    batch[IDS] = self._shard[IDS][i]
    batch[LOGP] = self._shard[LOGP][i]
    return batch
