"""Teacher-student distillation.

  python -m xlingo.distill --config configs/distill_tiny.py --workdir workdirs/distill \
      --config.distill.teacher_workdir=workdirs/teacher [--config.KEY=VALUE]

The student (``config.model``) learns from

  loss = alpha * tau^2 * KL(p_teacher^tau || p_student^tau) + (1 - alpha) * CE(student)

per non-padding token (``losses.kl_divergence`` defines the KL, also its top-k form). The
teacher is restored from an xlingo checkpoint (a workdir or a step directory), frozen: it is
passed into the step as ``extra`` under ``stop_gradient``, has no optimizer state, runs in
``distill.teacher_model.dtype`` (bf16 by default) and is never saved with the student.
Everything else (resume, SIGTERM, metrics, evaluation) is the shared loop's.

Offline teacher logits: run the teacher once over the student's training stream and keep its
top-k (xlingo/training/teacher_logits.py), then train students from them without a teacher:

  python -m xlingo.distill dump --config configs/distill_tiny.py --workdir TEACHER_OUT \
      --config.distill.teacher_workdir=workdirs/teacher --config.distill.top_k=16
  python -m xlingo.distill --config configs/distill_tiny.py --workdir workdirs/distill \
      --config.distill.teacher_logits=TEACHER_OUT --config.distill.top_k=16

The teacher's shape comes from its checkpoint's metadata (``distill.teacher_model_source =
'checkpoint'``) or from ``distill.teacher_model`` ('config', which must then agree with the
metadata); the remaining keys of ``distill.teacher_model`` (dtype, max_len, attention_impl, ...)
are always read from the config. Teacher and student must share the vocabulary and the
language table.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xlingo import cli, paths
from xlingo.errors import ConfigError

# Keys of the model section that fix parameter shapes of a single block.
LAYER_SHAPE_KEYS = ("d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")


# --- the teacher ---------------------------------------------------------------------------


TEACHER = "distill.teacher_workdir"


def teacher_model_config(config, meta: dict | None = None,
                         step_dir: str | None = None) -> ml_collections.ConfigDict:
  """The teacher's model section, checked against its checkpoint's metadata (by default the
  newest checkpoint whose metadata reads) and against the student."""
  from xlingo.training import load
  from xlingo.training import restore as restore_lib

  d = config.distill
  if meta is None:
    step_dir, meta = load.newest_meta(d.teacher_workdir, TEACHER)
  tm = ml_collections.ConfigDict(d.teacher_model.to_dict())
  fingerprint = restore_lib.model_fingerprint(config)
  shape_keys = [k for k in restore_lib.MODEL_KEYS if k in config.model]
  if d.teacher_model_source not in ("checkpoint", "config"):
    raise ConfigError(f"distill.teacher_model_source={d.teacher_model_source!r}; use "
                      "'checkpoint' (read the teacher's shape from its metadata) or 'config'")
  if not meta and d.teacher_model_source == "checkpoint":
    raise ConfigError(f"teacher checkpoint {step_dir} has no meta/metadata; set "
                      "distill.teacher_model_source='config' and describe it in "
                      "distill.teacher_model")
  if meta:
    if d.teacher_model_source == "checkpoint":
      for k in shape_keys:
        if k in meta:
          tm[k] = type(tm[k])(meta[k])
    else:
      diff = [f"{k}: checkpoint {meta[k]} vs distill.teacher_model {tm[k]}"
              for k in shape_keys if k in meta and type(tm[k])(meta[k]) != tm[k]]
      if diff:
        raise ConfigError(f"distill.teacher_model disagrees with the teacher checkpoint "
                          f"{step_dir} ({', '.join(diff)}); fix distill.teacher_model or set "
                          "distill.teacher_model_source='checkpoint'")
  # The student learns the teacher's distribution token by token and language by language.
  shared = {"vocab_size": (tm.vocab_size, config.model.vocab_size),
            "num_languages": (tm.num_languages, config.model.num_languages)}
  if "languages" in meta:
    shared["languages"] = (list(meta["languages"]), list(config.data.languages))
  if meta.get("vocab_sha1") and fingerprint.get("vocab_sha1"):
    shared["vocabulary SHA-1"] = (meta["vocab_sha1"][:12], fingerprint["vocab_sha1"][:12])
  diff = [f"{k}: teacher {a} vs student {b}" for k, (a, b) in shared.items() if a != b]
  if diff:
    raise ConfigError(f"teacher {step_dir} and student do not share the vocabulary and language "
                      f"table ({', '.join(diff)}); distil from a teacher trained with the same "
                      "data.languages and vocabulary")
  if tm.max_len < config.data.seq_len:
    raise ConfigError(f"distill.teacher_model.max_len={tm.max_len} < data.seq_len="
                      f"{config.data.seq_len}; raise distill.teacher_model.max_len")
  return tm


def restore_teacher(config, mesh, rules, param_dtype: str | None = None):
  """The teacher (a ``load.LoadedModel``), its params placed in its own shardings on the
  student's mesh; a teacher workdir whose latest checkpoint is unreadable falls back to the
  previous one."""
  from xlingo.training.load import load_model

  def model_config(meta, step_dir):
    tm = teacher_model_config(config, meta, step_dir)
    if param_dtype is not None:
      tm.param_dtype = param_dtype
    return tm

  return load_model(config, config.distill.teacher_workdir, what=TEACHER, mesh=mesh,
                    rules=rules, model_config=model_config)


# --- student initialisation from teacher layers ---------------------------------------------


def _layer(params, model_cfg, i: int):
  if model_cfg.scan_layers:
    return jax.tree.map(lambda x: x[i], params["blocks"]["layers"])
  return params["blocks"][f"layers_{i}"]


def student_from_teacher_layers(student_params, teacher_params, student_cfg, teacher_cfg,
                                layers):
  """The student's params with its blocks copied from the teacher's ``layers`` (in order) and
  the embeddings, final norm and heads copied where the shapes agree. Scanned ([layers, ...])
  and unrolled (``layers_<i>``) parameters are both handled, on either side."""
  picked = [_layer(teacher_params, teacher_cfg, i) for i in layers]
  if student_cfg.scan_layers:
    blocks = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *picked)}
  else:
    blocks = {f"layers_{j}": p for j, p in enumerate(picked)}
  new = {}
  for k, v in student_params.items():
    if k == "blocks":
      new[k] = blocks
    elif k in teacher_params and jax.tree.structure(teacher_params[k]) == jax.tree.structure(v) \
        and all(a.shape == b.shape for a, b in zip(jax.tree.leaves(teacher_params[k]),
                                                   jax.tree.leaves(v))):
      new[k] = teacher_params[k]
    else:
      new[k] = v
  if jax.tree.structure(new) != jax.tree.structure(student_params):
    raise ConfigError("distill.init_from_teacher_layers: the teacher's blocks do not have the "
                      "student's parameters; the two models need the same block layout")
  bad = [f"{a.shape} vs {b.shape}" for a, b in zip(jax.tree.leaves(new),
                                                     jax.tree.leaves(student_params))
         if a.shape != b.shape]
  if bad:
    raise ConfigError(f"distill.init_from_teacher_layers: shapes differ ({bad[0]}); copying "
                      f"layers needs equal {', '.join(LAYER_SHAPE_KEYS)}")
  return jax.tree.map(lambda a, b: a.astype(b.dtype), new, student_params)


# --- the objective --------------------------------------------------------------------------


def check_distill_config(config) -> None:
  if "distill" not in config:
    raise ConfigError("the config has no 'distill' section; start from configs/distill_tiny.py")
  d = config.distill
  if d.schedule not in ("constant", "linear"):
    raise ConfigError(f"distill.schedule={d.schedule!r}; use 'constant' or 'linear'")
  for key in ("alpha", "alpha_end"):
    if not 0.0 <= d[key] <= 1.0:
      raise ConfigError(f"distill.{key}={d[key]} must be in [0, 1]")
  for key in ("temperature", "temperature_end"):
    if d[key] <= 0:
      raise ConfigError(f"distill.{key}={d[key]} must be > 0")
  if not 0 <= d.top_k <= config.model.vocab_size:
    raise ConfigError(f"distill.top_k={d.top_k} must be in [0, vocab_size]; 0 = full KL")
  t = config.train
  if d.teacher_logits:
    from xlingo.training import teacher_logits

    if d.init_from_teacher_layers:
      raise ConfigError("distill.init_from_teacher_layers needs the teacher's parameters; with "
                        "distill.teacher_logits leave it empty")
    teacher_logits.check_matches(config, teacher_logits.read_manifest(d.teacher_logits),
                                 d.teacher_logits)
  if t.loss_weights or t.main_language or t.contrastive.weight:
    raise ConfigError("distillation's loss takes no train.loss_weights, train.main_language or "
                      "train.contrastive.weight (they belong to the LM loss of xlingo.train and "
                      "xlingo.adapt); leave them unset")
  layers = tuple(d.init_from_teacher_layers)
  if not d.teacher_logits:
    tm = teacher_model_config(config)
  if layers:
    if len(layers) != config.model.num_layers:
      raise ConfigError(f"distill.init_from_teacher_layers={layers} names {len(layers)} layers "
                        f"but the student has model.num_layers={config.model.num_layers}")
    if not all(0 <= i < tm.num_layers for i in layers):
      raise ConfigError(f"distill.init_from_teacher_layers={layers}: the teacher has layers "
                        f"0..{tm.num_layers - 1}")
    diff = [f"{k} {tm[k]} vs {config.model[k]}" for k in LAYER_SHAPE_KEYS
            if tm[k] != config.model[k]]
    if diff:
      raise ConfigError(f"distill.init_from_teacher_layers needs teacher and student of the same "
                        f"width ({', '.join(diff)}); leave it empty to initialise from scratch")


def distill_objective(config, model, teacher_model, teacher_params):
  """The student's objective: the distillation term (KL to the bound teacher + CE) and, with
  the student's LID head, the language-ID term; the student's hints hidden as in LM training."""
  from xlingo.training import step, terms

  d, t = config.distill, config.train
  kl = terms.Distillation(
      teacher_model=teacher_model, teacher_params=teacher_params,
      alpha=(float(d.alpha), float(d.alpha_end)),
      temperature=(float(d.temperature), float(d.temperature_end)), schedule=str(d.schedule),
      steps=int(t.steps), top_k=int(d.top_k), z_loss=float(t.z_loss),
      chunk_size=terms.loss_chunk_size(config))
  more = (terms.LanguageId(float(t.lid_loss_weight)),) if config.model.lid_head else ()
  return step.Objective("distill", model, terms.Hints.from_config(config), (kl, *more))


def stored_objective(config, model, k: int):
  """:func:`distill_objective` with the teacher's top-k read from the batch
  (``distill.teacher_logits``) instead of a bound teacher."""
  from xlingo.training import step, terms

  d, t = config.distill, config.train
  kl = terms.StoredDistillation(
      k=int(k), batch_size=int(t.batch_size), seq_len=int(config.data.seq_len),
      alpha=(float(d.alpha), float(d.alpha_end)),
      temperature=(float(d.temperature), float(d.temperature_end)), schedule=str(d.schedule),
      steps=int(t.steps), z_loss=float(t.z_loss), chunk_size=terms.loss_chunk_size(config))
  more = (terms.LanguageId(float(t.lid_loss_weight)),) if config.model.lid_head else ()
  return step.Objective("distill", model, terms.Hints.from_config(config), (kl, *more))


def teacher_dtype_line(meta: dict, dtype: str, param_dtype: str) -> str:
  """The start-up line comparing the teacher's dtypes here (distill.teacher_model.dtype and
  param_dtype) with those it was trained in (its checkpoint's ``dtypes``)."""
  here = f"teacher runs in {dtype} with {param_dtype} parameters"
  trained = meta.get("dtypes") or {}
  if not trained:
    return f"{here}; its training dtypes are not recorded in its checkpoint (an older one)"
  was = (trained.get("model.dtype"), trained.get("model.param_dtype"))
  same = " (the same)" if was == (dtype, param_dtype) else ""
  return f"{here}; it was trained in {was[0]} with {was[1]} parameters{same}"


def build_objective(config, setup):
  """The teacher restored once (float32 when the student copies its layers), bound into the
  distillation term; the student's initial parameters from its layers when asked."""
  from xlingo.training import metrics

  if config.distill.teacher_logits:
    from xlingo.training import teacher_logits

    man = teacher_logits.read_manifest(config.distill.teacher_logits)
    metrics.console(f"teacher logits: {config.distill.teacher_logits} (top-{man['k']} of "
                    f"{man['teacher'].get('step_dir')}), no teacher restored")
    return stored_objective(config, setup.model, man["k"])
  layers = tuple(config.distill.init_from_teacher_layers)
  t = restore_teacher(config, setup.mesh, setup.rules,
                      param_dtype="float32" if layers else None)
  tm = t.model.config
  metrics.console(f"teacher: {t.step_dir} (d_model {tm.d_model}, {tm.num_layers} layers, "
                  f"dtype {tm.dtype}), frozen")
  teacher_params = t.params
  if layers and config.distill.teacher_model.param_dtype != "float32":
    teacher_params = jax.tree.map(
        lambda x: x.astype(config.distill.teacher_model.param_dtype), t.params)
  metrics.console(teacher_dtype_line(t.meta, tm.dtype,
                                     config.distill.teacher_model.param_dtype))
  objective = distill_objective(config, setup.model, t.model, teacher_params)
  if not layers:
    return objective

  def initial_params(factory):
    fresh = factory.init(jax.random.PRNGKey(config.train.seed)).params
    params = student_from_teacher_layers(fresh, t.params, config.model, tm, layers)
    metrics.console(f"student initialised from teacher layers {layers}")
    return jax.device_put(params, factory.param_shardings)

  return dataclasses.replace(objective, initial_params=initial_params)


def with_teacher_logits(config, train_it):
  from xlingo.training import teacher_logits

  out = config.distill.teacher_logits
  if not out:
    return train_it
  return teacher_logits.WithTeacherLogits(train_it, out, teacher_logits.read_manifest(out))


def make_recipe():
  from xlingo.training import step

  return step.Recipe("distill", build_objective, check_distill_config,
                     wrap_train_iterator=with_teacher_logits)


# --- dumping the teacher's top-k ------------------------------------------------------------


def teacher_top_k(model, params, batch, k: int):
  """The teacher's k most likely next tokens at each position: ``(ids [B, T, k] int32,
  log-probabilities [B, T, k] float32)``, log-softmax over the whole vocabulary."""
  from xlingo.training.terms import output_logits_fn

  hidden, _ = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                          batch["positions"], batch["lang_ids"], deterministic=True,
                          return_hidden=True)
  logp = jax.nn.log_softmax(output_logits_fn(model, params)(hidden).astype(jnp.float32), -1)
  logp, ids = jax.lax.top_k(logp, k)
  return ids.astype(jnp.int32), logp


def dump(config, out_dir: str, steps_per_shard: int | None = None) -> dict:
  """Runs the teacher once over the student's first ``train.steps`` training batches and
  writes their top-``distill.top_k`` ids and log-probabilities (xlingo.training.teacher_logits);
  returns the manifest. The manifest is written last: a dump without one is unfinished.
  A shard holds ``steps_per_shard`` steps (default: as many as fit in
  ``teacher_logits.SHARD_BYTES``), which is what the reader holds in memory at a time."""
  from xlingo import sharding
  from xlingo.data import inputs
  from xlingo.training import loop, metrics, teacher_logits

  d = config.distill
  k = int(d.top_k)
  if not 0 < k < config.model.vocab_size:
    raise ConfigError(f"distill.top_k={k}: a dump stores the teacher's top-k; set "
                      f"--config.distill.top_k=K with 0 < K < {config.model.vocab_size}")
  if d.teacher_logits:
    raise ConfigError("distill.teacher_logits is set: a dump needs the teacher itself "
                      "(distill.teacher_workdir); leave distill.teacher_logits empty")
  if jax.process_count() > 1:
    raise ConfigError("python -m xlingo.distill dump runs in one process; run it without "
                      "jax.distributed")
  if paths.exists(paths.join(out_dir, teacher_logits.MANIFEST)):
    raise ConfigError(f"{out_dir} already holds a dump ({teacher_logits.MANIFEST}); pick another "
                      "--workdir or delete it")
  teacher_model_config(config)  # one line for a teacher that does not fit, before the work
  s = loop.build(config)
  t = restore_teacher(config, s.mesh, s.rules)
  model = t.model

  top_k = jax.jit(lambda params, batch: teacher_top_k(model, params, batch, k))
  it = inputs.train_iterator(s.plan, config)
  batch_sh = sharding.batch_sharding(s.mesh)
  paths.makedirs(out_dir)
  steps = int(config.train.steps)
  steps_per_shard = steps_per_shard or teacher_logits.steps_per_shard(config, k)
  with sharding.mesh_context(s.mesh, s.rules):
    _dump_shards(config, out_dir, steps_per_shard, it, lambda b: top_k(t.params, b), batch_sh)
  man = teacher_logits.manifest(config, k, steps_per_shard, {
      "workdir": d.teacher_workdir, "step_dir": t.step_dir,
      "vocab_sha1": t.meta.get("vocab_sha1"), "step": t.meta.get("step")})
  paths.write_text(paths.join(out_dir, teacher_logits.MANIFEST), json.dumps(man, indent=1))
  metrics.console(f"teacher logits: {steps} steps of top-{k} in {out_dir}")
  return man


def _dump_shards(config, out_dir, steps_per_shard, it, top_k, batch_sh) -> None:
  from xlingo.data import iterator
  from xlingo.training import metrics, teacher_logits

  steps = int(config.train.steps)
  for first in range(0, steps, steps_per_shard):
    rows = {"inputs": [], teacher_logits.IDS: [], teacher_logits.LOGP: []}
    for _ in range(first, min(first + steps_per_shard, steps)):
      batch = next(it)
      ids, logp = top_k(iterator.to_global(batch, batch_sh))
      rows["inputs"].append(np.asarray(batch["inputs"]))
      rows[teacher_logits.IDS].append(np.asarray(ids))
      rows[teacher_logits.LOGP].append(np.asarray(logp))
    teacher_logits.write_shard(out_dir, first, {n: np.stack(v) for n, v in rows.items()})
    metrics.console(f"teacher logits: steps {first}..{first + len(rows['inputs']) - 1} written")


def run(config, workdir: str) -> dict:
  from xlingo.training import loop

  return loop.run(config, workdir, make_recipe())


def main(argv=None):
  argv = list(argv or sys.argv)
  # `dump` is a positional subcommand; absl flags would take it as an unknown argument.
  if len(argv) > 1 and argv[1] == "dump":
    cli.run_main(argv[:1] + argv[2:], __doc__, dump)
  else:
    cli.run_main(argv, __doc__, run)


if __name__ == "__main__":
  cli.exit_when_done(main)
