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
  xconfig.set_model_size(c.model, "small")
  c.train.steps = 400
  c.train.learning_rate = 3e-3
  return c


def student_config():
  c = _common()
  xconfig.set_model_size(c.model, "mini")
  c.train.steps = 200
  c.train.learning_rate = 3e-3
  return c


def get_config(arg=None):
  """'' : the distillation run; 'teacher' / 'student': plain LM runs of either model."""
  run = xconfig.parse_arg(arg, "configs/distill_small.py", run=("", "teacher", "student")).run
  if run == "teacher":
    return teacher_config()
  if run == "student":
    return student_config()
  c = student_config()
  c.distill = xconfig.distill_section(teacher_config().model)
  return c
