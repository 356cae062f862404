"""Distillation with tiny models for tests: a 1-layer student of a configs/tiny.py teacher.

python -m xlingo.train --config configs/tiny.py --workdir /tmp/xlingo_tiny
python -m xlingo.distill --config configs/distill_tiny.py --workdir /tmp/xlingo_distill_tiny \
    --config.distill.teacher_workdir=/tmp/xlingo_tiny
"""

import ml_collections

from configs import tiny


def distill_section(teacher_model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``distill`` section shared by the distillation configs."""
  d = ml_collections.ConfigDict()
  d.teacher_workdir = ""  # a teacher workdir (latest checkpoint) or a checkpoint step dir
  # 'checkpoint': the teacher's shape keys come from its checkpoint metadata; 'config': from
  # teacher_model, checked against the metadata. Other keys (dtype, max_len, ...) always
  # come from teacher_model.
  d.teacher_model_source = "checkpoint"
  d.teacher_model = ml_collections.ConfigDict(teacher_model.to_dict())
  d.teacher_model.dtype = "bfloat16"  # the teacher's forward pass
  d.teacher_model.remat_policy = "none"  # no backward pass through the teacher
  d.teacher_model.dropout_rate = 0.0
  d.alpha = 0.5  # weight of tau^2 * KL; 1 - alpha on the student's cross-entropy
  d.temperature = 2.0
  d.schedule = "constant"  # constant | linear (from alpha/temperature to *_end over train.steps)
  d.alpha_end = 0.5
  d.temperature_end = 2.0
  d.top_k = 0  # > 0: KL over the teacher's top-k logits only (see losses.kl_divergence)
  d.init_from_teacher_layers = ()  # e.g. (0, 2): student blocks copied from these teacher layers
  return d


def get_config(arg=None):
  del arg
  c = tiny.get_config()
  c.distill = distill_section(c.model)
  c.model.num_layers = 1
  return c
