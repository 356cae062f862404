# Copyright 2025 The xlingo Authors. Licensed under the Apache License, Version 2.0.
"""The TPU launcher's preflight: what `create`, `run` and `watch` (and their --dry-run) check
before any gcloud command is printed or run, so that a mistake costs a line, not a slice.

- the accelerator type against Google's names and sizes (`v5e-N` is accepted as Google's
  `v5litepod-N` with a note), and the TPU software version for its generation;
- the zone against the zones that offer the generation;
- the gcloud project and account that would pay;
- the config, loaded here with the trainer's own flag parser and the `--config.K=V` overrides
  given after `--`: the file exists, a TFDS corpus has `data.tfds_data_dir`, a 32k model has a
  vocabulary of its size, and the mesh multiplies to the slice's chips;
- with `--fit`, bench/tpu_aot.py compiles the train step for the slice's libtpu topology and
  the run is refused when one chip's memory does not fit.

Every problem is collected and reported (one line each, naming the fix); notes and problems go
to stderr, so a dry run's stdout stays the gcloud commands alone. The accelerator and zone
checks need only the standard library; the config check imports xlingo from this checkout
(launch/tpu.sh runs the launcher with .venv/bin/python when it exists).
"""

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCEL_RE = re.compile(r"^(v\d+[a-z]*)-(\d+)$")

# Zones per generation: Google's "TPU regions and zones" page (cloud.google.com/tpu/docs/
# regions-zones), read 2026-12-07. The North America rows and v6e's europe-west4-a are from
# that reading; v5p/v5e's europe-west4-b, v5e's us-east1-c, us-east5-b and asia-southeast1-b
# and v6e's asia-northeast1-b and southamerica-west1-a are from earlier versions of the same
# page (its other sections did not come through). Google adds zones: --any-zone skips the check.
ZONES_READ = "2026-12-07"


class Family(NamedTuple):
  """One TPU generation as Google names and sells it."""
  cores_per_chip: int  # what the number in the name counts per chip (v4, v5p: TensorCores)
  sizes: tuple  # the numbers Google offers; () with `step`: any multiple of step up to `largest`
  step: int
  largest: int
  runtime: str  # Google's TPU software versions table (JAX)
  libtpu: str  # the generation's name in libtpu topology names ("" when --fit cannot use it)
  zones: tuple


FAMILIES = {
    "v6e": Family(1, (1, 4, 8, 16, 32, 64, 128, 256), 0, 256, "v2-alpha-tpuv6e", "v6e",
                  ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "us-central1-ai1",
                   "us-south1-ai1b", "europe-west4-a", "asia-northeast1-b",
                   "southamerica-west1-a")),
    "v5litepod": Family(1, (1, 4, 8, 16, 32, 64, 128, 256), 0, 256, "v2-alpha-tpuv5-lite", "v5e",
                        ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a",
                         "us-east1-c", "us-east5-b", "europe-west4-b", "asia-southeast1-b")),
    # v4 and v5p slices are 3D tori of 4-chip hosts: any multiple of 8 TensorCores.
    "v5p": Family(2, (), 8, 12288, "v2-alpha-tpuv5", "v5p",
                  ("us-central1-a", "us-east5-a", "europe-west4-b")),
    # libtpu's v4 topologies list one device per TensorCore (v4:2x2x4 has 32), while a v4 VM
    # runs one megacore device per chip: a compile for them is not the program a v4-32 runs.
    "v4": Family(2, (), 8, 4096, "tpu-ubuntu2204-base", "", ("us-central2-b",)),
    "v3": Family(2, (8, 32, 64, 128, 256, 512, 1024, 2048), 0, 2048, "tpu-ubuntu2204-base", "",
                 ()),
    "v2": Family(2, (8, 32, 128, 256, 512), 0, 512, "tpu-ubuntu2204-base", "", ()),
}
# Spellings people use (the README once did) for Google's names.
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}
# libtpu topologies (chips per dimension) of the default slice shapes, by chip count.
TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
               256: "16x16"}
TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
               256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
# --fit's compile: it takes the trainers' --config and overrides.
TPU_AOT = os.path.join(ROOT, "bench", "tpu_aot.py")


class Slice(NamedTuple):
  accelerator_type: str  # Google's name
  family: str
  chips: int


class Report:
  """Notes (printed as they come) and problems (printed together at the end)."""

  def __init__(self, out=None):
    self.out = out or sys.stderr
    self.problems = []

  def note(self, msg):
    print(f"[preflight] {msg}", file=self.out, flush=True)

  def problem(self, msg):
    self.problems.append(msg)


def _offered(family: Family) -> str:
  if family.sizes:
    return ", ".join(str(s) for s in family.sizes)
  return f"multiples of {family.step} up to {family.largest}"


def _is_offered(family: Family, n: int) -> bool:
  if family.sizes:
    return n in family.sizes
  return n % family.step == 0 and 0 < n <= family.largest


def check_accelerator(report, accel, version):
  """Slice (Google's name, family, chips) for ``accel``; None when it cannot be used. A family
  not in the table passes only with an explicit --version (then its size is not checked)."""
  m = ACCEL_RE.match(accel)
  name, n = m.group(1), int(m.group(2))
  if name in ALIASES:
    google = f"{ALIASES[name]}-{n}"
    report.note(f"--accelerator-type {accel} is Google's {google}; using {google}")
    name = ALIASES[name]
  family = FAMILIES.get(name)
  if family is None:
    if version:
      report.note(f"accelerator family {name!r} is not in the launcher's table: its size, zone "
                  f"and chips are not checked (--version {version})")
      return Slice(accel, name, 0)
    report.problem(f"no known runtime version for accelerator family {name!r}; pass --version "
                   "(see Google's TPU software versions table), or use one of "
                   f"{', '.join(f + '-N' for f in FAMILIES)} (v5e-N is v5litepod-N)")
    return None
  if not _is_offered(family, n):
    counts = "TensorCores, two per chip" if family.cores_per_chip == 2 else "chips"
    report.problem(f"{name}-{n} is not a size Google offers: {name}-N with N in {_offered(family)} "
                   f"(N counts {counts}); pick one of those")
    return None
  return Slice(f"{name}-{n}", name, n // family.cores_per_chip)


def check_zone(report, zone, slc):
  family = FAMILIES.get(slc.family)
  if family is None or not family.zones:
    return
  if zone not in family.zones:
    report.problem(f"{slc.family} is not offered in zone {zone}; zones with {slc.family}: "
                   f"{', '.join(family.zones)} (Google's TPU regions and zones, read "
                   f"{ZONES_READ}; pass --any-zone if Google lists {zone} now)")


def libtpu_topology(slc):
  """libtpu's topology name for the slice (e.g. v5litepod-16 -> v5e:4x4), or None."""
  family = FAMILIES.get(slc.family)
  if family is None or not family.libtpu:
    return None
  table = TOPOLOGY_3D if family.cores_per_chip == 2 else TOPOLOGY_2D
  dims = table.get(slc.chips)
  return f"{family.libtpu}:{dims}" if dims else None


def check_gcloud_identity(report, gcloud, project_flag):
  """Shows the project and account gcloud would use; a missing one is a problem."""
  if shutil.which(gcloud) is None:
    report.note(f"gcloud not found (looked for {gcloud!r}): project and account not shown")
    return
  try:
    proc = subprocess.run([gcloud, "config", "list", "--format=json"], capture_output=True,
                          text=True, timeout=60)
    core = json.loads(proc.stdout or "{}").get("core", {}) if proc.returncode == 0 else None
  except (subprocess.TimeoutExpired, ValueError, AttributeError):
    core = None
  if core is None:
    report.note("could not read gcloud's configuration (`gcloud config list` failed): project "
                "and account not shown")
    return
  project = project_flag or core.get("project") or ""
  account = core.get("account") or ""
  where = " (--project)" if project_flag else ""
  report.note(f"gcloud project {project or '(none)'}{where}, account {account or '(none)'}")
  if not project:
    report.problem("gcloud has no project: pass --project P or run `gcloud config set project P`")
  if not account:
    report.problem("gcloud has no account: run `gcloud auth login`")


def load_config(config_arg, overrides):
  """The config as the trainer would load it (its flag parser, the overrides applied), or
  (None, the trainer's one-line error)."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from xlingo import cli

  path, _, arg = config_arg.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  argv = ["xlingo", "--config", full + (":" + arg if arg else ""), *overrides]
  err, saved = io.StringIO(), sys.argv
  try:
    with contextlib.redirect_stderr(err):
      return cli.parse_flags(argv, "").config, None
  except SystemExit:
    lines = err.getvalue().strip().splitlines() or ["the config could not be loaded"]
    return None, lines[-1].removeprefix("xlingo: error: ")
  finally:
    sys.argv = saved


def _embedded_vocab_size():
  import sentencepiece

  from xlingo.data import vocab_facts

  return sentencepiece.SentencePieceProcessor(
      model_file=vocab_facts.embedded_path()).get_piece_size()


def check_config(report, config_arg, overrides, slc):
  """Loads the config locally and checks what would otherwise fail on the slice."""
  path = config_arg.partition(":")[0]
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.isfile(full):
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.startswith("tpu"))
    report.problem(f"config file {path} does not exist in {ROOT}; pass --config "
                   f"configs/<name>.py (TPU configs: {', '.join(shipped)})")
    return None
  try:
    config, error = load_config(config_arg, overrides)
  except ImportError as e:
    report.problem(f"cannot load {path} here ({e}); run the launcher with the project's Python "
                   "(launch/tpu.sh uses .venv/bin/python, made by ./launch/local.sh test-fast) "
                   "or pass --no-config-check")
    return None
  if config is None:
    report.problem(f"{path}: {error}")
    return None
  d, mdl = config.data, config.model
  if d.source == "tfds":
    if not d.tfds_data_dir:
      report.problem(f"{path} reads TFDS {d.tfds_name or '(data.tfds_name)'} but "
                     "data.tfds_data_dir is empty; pass -- --config.data.tfds_data_dir="
                     "gs://BUCKET/tensorflow_datasets (where it was prepared with tfds build)")
    if not d.tfds_name:
      report.problem(f"{path} has data.source='tfds' but no data.tfds_name; pass -- "
                     "--config.data.tfds_name=c4/multilingual (or wiki40b)")
  if not d.vocab_path:
    shipped = _embedded_vocab_size()
    if shipped != mdl.vocab_size:
      report.problem(f"data.vocab_path is empty, so the shipped {shipped}-piece vocabulary would "
                     f"be used, but model.vocab_size={mdl.vocab_size}; pass -- "
                     f"--config.data.vocab_path=gs://BUCKET/vocab.model with {mdl.vocab_size} "
                     "pieces (python -m xlingo.data.vocab train)")
  elif "://" not in d.vocab_path and not os.path.exists(os.path.join(ROOT, d.vocab_path)):
    report.problem(f"data.vocab_path={d.vocab_path} does not exist in {ROOT} (the workers get "
                   "this checkout); point it at a gs:// file or a committed one")
  mesh = f"data={config.mesh.data} fsdp={config.mesh.fsdp} tensor={config.mesh.tensor}"
  if slc is None or not slc.chips:
    report.note(f"{path}: mesh {mesh} not checked against the slice (pass --accelerator-type)")
    return config
  check_mesh(report, config, path, slc)
  return config


def check_mesh(report, config, path, slc):
  """The mesh against the slice's chips (one JAX device per chip) and the batch against the
  data-parallel axes, with the trainer's own mesh arithmetic."""
  from xlingo import sharding
  from xlingo.errors import ConfigError

  try:
    data, fsdp, tensor = sharding.mesh_shape(config.mesh, slc.chips)
  except ConfigError as e:
    wanted = math.prod(abs(int(s)) for s in (config.mesh.data, config.mesh.fsdp,
                                             config.mesh.tensor))
    family = FAMILIES[slc.family]
    other = f"{slc.family}-{wanted * family.cores_per_chip}"
    larger = (f", or a {other} ({wanted} chips)"
              if _is_offered(family, wanted * family.cores_per_chip) else "")
    report.problem(f"{path}'s mesh does not fit {slc.accelerator_type} ({slc.chips} chips): {e} "
                   f"(e.g. -- --config.mesh.fsdp=-1{larger})")
    return
  per_step = config.train.batch_size // max(int(config.train.microbatches), 1)
  if per_step % (data * fsdp):
    report.problem(f"{path}: train.batch_size={config.train.batch_size} / train.microbatches="
                   f"{config.train.microbatches} rows do not split over data x fsdp = "
                   f"{data * fsdp} on {slc.accelerator_type}; make the rows a multiple of "
                   f"{data * fsdp}")
    return
  report.note(f"{path}: mesh data={data} fsdp={fsdp} tensor={tensor} on "
              f"{slc.accelerator_type} ({slc.chips} chips), {per_step} rows per step")


def compile_fit(config_arg, topology, overrides):
  """bench/tpu_aot.py's JSON for the config on the topology, or raises RuntimeError with its
  one-line error."""
  proc = subprocess.run([sys.executable, TPU_AOT, "--config", config_arg, "--topology",
                         topology, *overrides], cwd=ROOT, capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    raise RuntimeError(err)
  return json.loads(lines[-1])


def check_fit(report, config_arg, overrides, slc, compile_fn=compile_fit):
  """--fit: one chip's memory for the compiled train step against its HBM."""
  topology = libtpu_topology(slc)
  if topology is None:
    why = ("libtpu's v4 topologies have one device per TensorCore, a v4 VM one per chip "
           "(docs/TPU.md)" if slc.family == "v4" else "no libtpu topology is known for it")
    report.problem(f"--fit cannot check {slc.accelerator_type}: {why}; drop --fit")
    return
  report.note(f"--fit: compiling {config_arg} for {topology} with bench/tpu_aot.py (minutes)")
  try:
    got = compile_fn(config_arg, topology, overrides)
  except RuntimeError as e:
    report.problem(f"--fit: bench/tpu_aot.py failed for {topology}: {e}")
    return
  total, hbm, spare = got.get("total_gib"), got.get("hbm_gib"), got.get("spare")
  if spare is None:
    report.problem(f"--fit: no HBM figure for {got.get('device_kind')}; read {total} GiB per "
                   "chip against the chip's memory yourself, then drop --fit")
  elif spare < 0:
    report.problem(f"{config_arg} does not fit {slc.accelerator_type}: {total} GiB per chip of "
                   f"{hbm} GiB ({topology}); raise train.microbatches, lower train.batch_size "
                   "or take a larger slice")
  else:
    report.note(f"--fit: {total} GiB per chip of {hbm} GiB on {topology} ({spare:.0%} spare)")


def run(args, gcloud, out=None):
  """The preflight for parsed launcher ``args``: returns the problems (empty: go ahead). Sets
  ``args.accelerator_type`` to Google's name and ``args.version`` to its software version."""
  report = Report(out)
  accel = getattr(args, "accelerator_type", None)
  slc = None
  if accel:
    slc = check_accelerator(report, accel, getattr(args, "version", None))
    if slc is not None:
      args.accelerator_type = slc.accelerator_type
      family = FAMILIES.get(slc.family)
      if family is not None:
        if getattr(args, "version", None) is None:
          args.version = family.runtime
        report.note(f"{slc.accelerator_type}: {slc.chips} chips, software version {args.version}")
      if not args.any_zone:
        check_zone(report, args.zone, slc)
  check_gcloud_identity(report, gcloud, args.project)
  if hasattr(args, "config"):
    if args.no_config_check:
      report.note("config not checked (--no-config-check)")
    else:
      config = check_config(report, args.config, args.extra, slc)
      if args.fit and (slc is None or not slc.chips):
        report.problem("--fit needs the slice: pass --accelerator-type")
      elif args.fit and report.problems:
        report.note("--fit skipped: the problems below come first")
      elif args.fit and config is not None:
        check_fit(report, args.config, args.extra, slc)
  return report.problems
