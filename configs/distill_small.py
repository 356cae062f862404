"""Distillation on the embedded corpus (the docs/DISTILLATION.md result), sized for a CPU.

Teacher: 4 layers, d_model 128 (2.1 M parameters). Student: 2 layers, d_model 64 (0.66 M).
The exact commands (teacher, distilled student, LM-only student) are in docs/DISTILLATION.md:

python -m xlingo.train --config configs/distill_small.py:teacher --workdir /tmp/distill/teacher
python -m xlingo.distill --config configs/distill_small.py --workdir /tmp/distill/student_kd \
    --config.distill.teacher_workdir=/tmp/distill/teacher
python -m xlingo.train --config configs/distill_small.py:student --workdir /tmp/distill/student_lm
"""

from xlingo import config as xconfig


def _common():
  c = xconfig.base_config()
  c.model.max_len = 128
  c.model.dtype = "float32"
  c.data.seq_len = 128
  c.train.batch_size = 8
  c.train.warmup_steps = 20
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 100
  return c


def teacher_config():
  c = _common()
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 512
  c.train.steps = 400
  c.train.learning_rate = 3e-3
  return c


def student_config():
  c = _common()
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 16
  c.model.mlp_dim = 256
  c.train.steps = 200
  c.train.learning_rate = 3e-3
  return c


def get_config(arg=None):
  """'' : the distillation run; 'teacher' / 'student': plain LM runs of either model."""
  if arg == "teacher":
    return teacher_config()
  if arg == "student":
    return student_config()
  if arg:
    raise xconfig.ConfigError(f"configs/distill_small.py:{arg}: use no argument, 'teacher' or 'student'")
  c = student_config()
  c.distill = xconfig.distill_section(teacher_config().model)
  return c
