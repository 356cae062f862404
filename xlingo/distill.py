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

The teacher's shape comes from its checkpoint's metadata (``distill.teacher_model_source =
'checkpoint'``) or from ``distill.teacher_model`` ('config', which must then agree with the
metadata); the remaining keys of ``distill.teacher_model`` (dtype, max_len, attention_impl, ...)
are always read from the config. Teacher and student must share the vocabulary and the
language table.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections

from xlingo import cli
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


def scheduled(start: float, end: float, kind: str, step, steps: int):
  """``start``, or linear from ``start`` at step 0 to ``end`` at ``steps`` (kind 'linear')."""
  if kind == "constant" or step is None:
    return jnp.float32(start)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  return jnp.float32(start) + (end - start) * frac


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
  if t.loss_weights or t.main_language or t.contrastive.weight:
    raise ConfigError("distillation's loss takes no train.loss_weights, train.main_language or "
                      "train.contrastive.weight (they belong to the LM loss of xlingo.train and "
                      "xlingo.adapt); leave them unset")
  tm = teacher_model_config(config)
  layers = tuple(d.init_from_teacher_layers)
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


def distill_loss(teacher_model, ctx, params, batch, rng, extra):
  """alpha * tau^2 * KL + (1 - alpha) * CE, summed over tokens; ``extra['teacher_params']``.

  Both models return hidden states; the loss projects them onto the vocabulary
  ``train.loss_chunk_size`` positions at a time (``losses.chunked_distillation``), so neither
  the teacher's nor the student's [B, T, V] logits are ever held whole.
  """
  from xlingo.training import losses, step

  d, t = ctx.config.distill, ctx.config.train
  feats = (batch["inputs"], batch["segment_ids"], batch["positions"])
  # Frozen teacher: no gradient, so no activations are kept for a backward pass.
  teacher_params = jax.lax.stop_gradient(extra["teacher_params"])
  t_hidden, _ = teacher_model.apply({"params": teacher_params}, *feats, batch["lang_ids"],
                                    deterministic=True, return_hidden=True)
  # The student's language hints are hidden as in LM training (model.lang_emb_dropout).
  hint_ids, hidden_bt = step.hide_language_hints(ctx, batch, jax.random.fold_in(rng, 1))
  s_hidden, lid_logits = ctx.model.apply({"params": params}, *feats, hint_ids,
                                         deterministic=ctx.deterministic, rngs={"dropout": rng},
                                         return_hidden=True)
  step_now = getattr(ctx, "step", None)
  alpha = scheduled(d.alpha, d.alpha_end, d.schedule, step_now, t.steps)
  tau = scheduled(d.temperature, d.temperature_end, d.schedule, step_now, t.steps)
  w = batch["loss_weights"]
  ce_sum, ce_pt, kl_sum, kl_pt = losses.chunked_distillation(
      step.output_logits_fn(ctx.model, params), s_hidden,
      step.output_logits_fn(teacher_model, teacher_params), t_hidden, batch["targets"], w,
      z_loss=t.z_loss, temperature=tau, top_k=d.top_k or None,
      chunk_size=step.loss_chunk_size(ctx.config))
  total = alpha * tau**2 * kl_sum + (1.0 - alpha) * ce_sum
  # 'loss' stays the student's own cross-entropy: the loop turns it into bits per byte.
  aux = {"per_token": {"loss": ce_pt, "kl": kl_pt}, "kl_sum": kl_sum, "ce_sum": ce_sum}
  lid_total, lid_aux = step.language_id_term(ctx.config, lid_logits, batch, hidden_bt)
  aux.update(lid_aux)
  return total + lid_total, aux


def make_objective():
  """The distillation :class:`~xlingo.training.step.Objective` (teacher built on first use)."""
  from xlingo.training import metrics, step

  teacher: dict = {}

  def prepare_extra(config, mesh, rules):
    t = restore_teacher(config, mesh, rules)
    teacher["model"] = t.model
    tm = t.model.config
    metrics.console(f"teacher: {t.step_dir} (d_model {tm.d_model}, {tm.num_layers} layers, "
                    f"dtype {tm.dtype}), frozen")
    return {"teacher_params": t.params}

  def initial_params(factory, config):
    layers = tuple(config.distill.init_from_teacher_layers)
    if not layers:
      return factory.init(jax.random.PRNGKey(config.train.seed)).params
    t = restore_teacher(config, factory.mesh, factory.rules, param_dtype="float32")
    fresh = factory.init(jax.random.PRNGKey(config.train.seed)).params
    params = student_from_teacher_layers(fresh, t.params, config.model, t.model.config, layers)
    metrics.console(f"student initialised from teacher layers {layers}")
    return jax.device_put(params, factory.param_shardings)

  def loss_fn(ctx, params, batch, rng, extra):
    return distill_loss(teacher["model"], ctx, params, batch, rng, extra)

  return step.Objective(name="distill", loss_fn=loss_fn, prepare_extra=prepare_extra,
                        initial_params=initial_params, check_config=check_distill_config)


def run(config, workdir: str) -> dict:
  from xlingo.training import loop

  return loop.run(config, workdir, make_objective())


def main(argv=None):
  cli.run_main(argv or sys.argv, __doc__, run)


if __name__ == "__main__":
  main()
