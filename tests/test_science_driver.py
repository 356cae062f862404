"""bench/science.py (docs/SCIENCE.md): its plan of runs, its statistics and its language judge."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import science  # noqa: E402


def test_mean_and_sample_sd():
  assert science.ms([1.0, 3.0]) == "2.000 ± 1.414"
  assert science.ms([2.5]) == "2.500"  # one seed: no spread to show
  assert science.ms([None, float("nan")]) == "-"


def test_every_experiment_names_known_runs_and_their_configs_load():
  import importlib

  for exp, names in science.EXPERIMENTS.items():
    assert exp in science.TABLES
    for name in names:
      run = science.RUNS[name]
      path, _, arg = run.config.partition(":")
      mod = importlib.import_module(path[:-len(".py")].replace("/", "."))
      c = mod.get_config(arg or None)
      assert c.train.steps > 0
      assert all(dep in science.RUNS for dep in run.needs)


def test_dry_run_orders_dependencies_first_and_seeds_every_run(tmp_path, capsys):
  science._PRINTED.clear()
  science.main(["adaptation", "--dry_run", "--seeds", "3,4", "--root", str(tmp_path)])
  lines = [x for x in capsys.readouterr().out.splitlines() if "-m xlingo." in x]
  assert "xlingo.train" in lines[0] and "pre6m/s3" in lines[0]
  lora = next(x for x in lines if "adapt_lora/s4" in x)
  assert "--config.train.seed=4" in lora and "--config.data.seed=4" in lora
  assert f"--config.checkpoint.init_from={tmp_path}/pre6m/s4" in lora
  assert "--config.adapt.mode=lora" in lora and "--config.train.learning_rate=3e-3" in lora
  per_language = next(x for x in lines if "adapt_adapter_lang/s3" in x)
  assert "--config.adapt.adapter.per_language=True" in per_language
  assert "per_language" not in next(x for x in lines if "adapt_adapter/s3" in x)
  # Each run once per seed, however many runs need it.
  assert sum(f"--workdir={tmp_path}/pre6m/s3 " in x for x in lines) == 1
  assert len(lines) == 2 * (1 + len(science.ADAPT_MODES))


def test_finished_runs_are_read_not_rerun(tmp_path, capsys):
  wd = tmp_path / "base" / "s0"
  wd.mkdir(parents=True)
  (wd / "science_done.json").write_text(json.dumps({"command": [], "wall_s": 12.0}))
  rows = [{"step": 0, **{f"val/bpb/{k}": 3.0 for k in science.LANGS}},
          {"step": 10, "loss": 1.0, "step_time_s": 0.5},
          {"step": 10, "loss": 1.0, "step_time_s": 0.25},
          {"step": 10, **{f"val/bpb/{k}": 2.0 for k in science.LANGS}}]
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  science._PRINTED.clear()
  science.ensure("base", 0, str(tmp_path), dry_run=True)
  assert "-m xlingo" not in capsys.readouterr().out
  assert science.final_val(str(wd))["step"] == 10
  assert science.mean_bpb(science.final_val(str(wd))) == pytest.approx(2.0)
  assert science.step_time(str(wd)) == 0.25  # the first interval (compile) left out
  assert science.wall(str(wd)) == 12.0


def test_the_character_judge_tells_the_embedded_languages_apart():
  lid = science.CharTrigramLID(lines_per_lang=1500)
  assert lid.accuracy_on_validation(lines_per_lang=50) > 0.9
  assert lid.predict("Das Paket wird installiert, wenn") == "de"
  assert lid.predict("") is None


def test_equal_bytes_steps_read_the_reference_text_at_the_runs_own_rate(tmp_path, capsys):
  # 200 steps read 1.2 MB of Greek with one vocabulary, 0.2 MB with the other.
  ext, old = {"step": 200, "bytes/el": 1_200_000}, {"step": 200, "bytes/el": 200_000}
  assert science.equal_bytes_steps(ext, old) == 33  # 200 * 0.2 / 1.2
  assert science.equal_bytes_steps(old, ext) == 1200
  assert science.equal_bytes_steps(ext, {"bytes/el": 1}) == 1  # never 0 steps
  science._PRINTED.clear()
  science.main(["vocab_long", "--dry_run", "--seeds", "0", "--root", str(tmp_path)])
  eqb = [x for x in capsys.readouterr().out.splitlines() if "el_old_eqb/s0" in x][0]
  assert "--config.train.steps=<steps in which el_old reads el_ext's bytes/el>" in eqb


def test_planned_share_is_read_from_the_start_of_run_table(tmp_path):
  (tmp_path / "science_log.txt").write_text(
      "task                     lang    examples      tokens ex.share tok.share  epochs valid.\n"
      "xlingo.lm.ru             ru        18,719     596,507    0.625     0.543    0.56    yes\n")
  assert science.planned_share(str(tmp_path), "ru") == 0.543
  with pytest.raises(ValueError, match="no start-of-run row for zh"):
    science.planned_share(str(tmp_path), "zh")
