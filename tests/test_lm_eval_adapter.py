"""The lm-evaluation-harness adaptor: ``evaluate --multiple_choice`` gives lm-eval's own numbers.

The golden fixture (tests/fixtures/lm_eval/tiny_random.json) is lm-eval 0.4.13's output
(``simple_evaluate`` with ``log_samples``) for the xlingo model on the shipped tasks,
written by bench/make_lm_eval_fixtures.py; here the same checkpoint (configs/tiny.py's model
initialised from a fixed seed) is rebuilt and xlingo's own evaluation, without lm-eval, must
give the same per-item log-likelihoods (to 1e-4) and the same acc / acc_norm (exactly). Where
lm-eval is importable (the ``eval`` extra), it is also run live. CI has no lm-eval: the
fixture is the comparison there.
"""

import ast
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from xlingo import likelihood, multiple_choice
from xlingo.errors import ConfigError, DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lm_eval" / "tiny_random.json"


def _recipe():
  spec = importlib.util.spec_from_file_location(
      "xlingo_make_lm_eval_fixtures", ROOT / "bench" / "make_lm_eval_fixtures.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


RECIPE = _recipe()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(step dir, LoadedModel) of the fixture's checkpoint."""
  from xlingo.training.load import load_model

  step_dir = RECIPE.build_checkpoint(str(tmp_path_factory.mktemp("lm_eval") / "tiny_random"))
  return step_dir, load_model(RECIPE.tiny_config(), step_dir, what="--checkpoint")


def _task_of(name: str) -> tuple[str, str]:
  """('chapter', lang) or ('translation', lang) of an lm-eval task name."""
  if name.startswith("xlingo_chapter_"):
    return "chapter", name[len("xlingo_chapter_"):]
  return "translation", name[len("xlingo_translation_en-"):]


def _check_equal(lm_eval_tasks: dict, ours: dict) -> None:
  for task, want in lm_eval_tasks.items():
    name, lang = _task_of(task)
    got = ours[(name, lang)]
    assert len(got["items"]) == len(want["items"]), task
    for g, w in zip(got["items"], want["items"]):
      assert (g["doc_id"], g["gold"]) == (w["doc_id"], w["gold"]), task
      np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=1e-6, atol=1e-4,
                                 err_msg=f"{task} doc {w['doc_id']}")
    assert got["acc"] == want["acc"], task
    assert got["acc_norm"] == want["acc_norm"], task


def _ours(lm, tasks: dict) -> dict:
  """evaluate's multiple-choice results for the items (doc ids) of lm-eval's ``tasks``."""
  out = {}
  for name in ("chapter", "translation"):
    idx = {lang: [i["doc_id"] for i in r["items"]] for t, r in tasks.items()
           for n, lang in [_task_of(t)] if n == name}
    if idx:
      res = multiple_choice.evaluate(lm, name, list(idx), "test", indices=idx)
      out |= {(name, lang): r for lang, r in res.items()}
  return out


def test_evaluate_equals_lm_eval_fixture(tiny):
  """xlingo's own multiple-choice evaluation reproduces lm-eval's recorded numbers."""
  fixture = json.loads(FIXTURE.read_text())
  assert fixture["seed"] == RECIPE.SEED and fixture["max_len"] == RECIPE.MAX_LEN
  tasks = fixture["tasks"]
  assert any(t.startswith("xlingo_chapter_") for t in tasks)
  assert any(t.startswith("xlingo_translation_") for t in tasks)
  golds = {t: {i["gold"] for i in r["items"]} for t, r in tasks.items()}
  assert all(len(g) > 1 for g in golds.values()), golds  # items of several classes/positions
  _check_equal(tasks, _ours(tiny[1], tasks))


def test_lm_eval_live(tiny):
  """lm-eval itself (when installed) on two tasks: the same numbers as evaluate's."""
  pytest.importorskip("lm_eval")
  tasks = ["xlingo_chapter_de", "xlingo_translation_en-ja"]
  live = RECIPE.lm_eval_results(tiny[0], 3, tasks=tasks)
  assert sorted(live) == sorted(tasks)
  _check_equal(live, _ours(tiny[1], live))


def test_adapter_generate_and_rolling(tiny):
  """generate_until is xlingo.decode's greedy continuation cut at the stop string;
  loglikelihood_rolling of a text that fits one row is its log-likelihood after the start id;
  an unknown language is a one-line ConfigError."""
  pytest.importorskip("lm_eval")
  from lm_eval.api.instance import Instance

  from xlingo import decode
  from xlingo.lm_eval_adapter import XlingoLM

  config = str(ROOT / "configs" / "tiny.py")
  lm = XlingoLM(checkpoint=tiny[0], config=config, max_length=RECIPE.MAX_LEN, lang="de",
                batch_size=8)
  want = decode.generate(lm.lm.model, lm.lm.params, lm.lm.vocab, ["Debian ist"],
                         lm.lm.table.id("de"), max_len=12)[0]
  stop = want[len(want) // 2:][:2] or "\x00"
  got = lm.generate_until([
      Instance("generate_until", {}, ("Debian ist", {"until": [], "max_gen_toks": 12}), 0),
      Instance("generate_until", {}, ("Debian ist", {"until": [stop], "max_gen_toks": 12}), 1)])
  assert got == [want, want[:want.index(stop)] if stop in want else want]
  text = "Debian ist ein freies Betriebssystem."
  ids = tuple(lm.lm.vocab.encode(text))
  de = lm.lm.table.id("de")
  whole = likelihood.score(lm.lm, [likelihood.Request((), ids, de, de)]).logprobs[0]
  assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)]) == [whole]
  with pytest.raises(ConfigError, match="lang=xx is not a language of"):
    XlingoLM(checkpoint=tiny[0], config=config, lang="xx")


def test_evaluate_command_one_line_errors(tiny, capsys):
  """An unknown --multiple_choice name and an unknown language: one line, exit 2."""
  from xlingo import evaluate

  base = ["evaluate", "--config", str(ROOT / "configs" / "tiny.py"), "--checkpoint", tiny[0]]
  for extra, want in ((["--multiple_choice", "bogus"], "is not a multiple-choice task"),
                      (["--multiple_choice", "chapter", "--lang", "xx", "--limit", "1"],
                       "xx is not a language of")):
    with pytest.raises(SystemExit) as e:
      evaluate.main(base + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


def test_long_requests_left_truncated_or_refused(tiny):
  """A request longer than the context keeps its continuation and its context's last tokens;
  a continuation that alone does not fit is a one-line ConfigError."""
  lm = tiny[1]
  max_len = int(lm.model.config.max_len)
  ctx, cont = tuple(range(10, 10 + max_len)), (5, 6, 7)
  scored = likelihood.score(lm, [likelihood.Request(ctx, cont, 0, 1)])
  cut = likelihood.Request(ctx[len(ctx) - (max_len - 3):], cont, 0, 1)
  assert scored.truncated == 1
  assert scored.logprobs == likelihood.score(lm, [cut]).logprobs
  with pytest.raises(ConfigError, match="continuation is .* longer than the model's context"):
    likelihood.score(lm, [likelihood.Request((), tuple(range(max_len + 1)))])


def test_rolling_windows_cover_each_token_once(tiny):
  """Rolling windows predict every token exactly once; a text that fits in one row scores
  as the loglikelihood of the whole text after an empty context."""
  for n in (1, 7, 8, 9, 21):
    ids = tuple(range(100, 100 + n))
    windows = likelihood.rolling_requests(ids, 8)
    assert [t for w in windows for t in w.continuation] == list(ids)
    for w in windows:
      start = w.continuation[0] - 100
      assert len(w.context) + len(w.continuation) <= 8
      assert w.context == ids[start - len(w.context):start]
  lm = tiny[1]
  ids = tuple(range(40, 90))
  whole = likelihood.score(lm, [likelihood.Request((), ids)]).logprobs[0]
  parts = likelihood.score(lm, likelihood.rolling_requests(ids, 256)).logprobs
  assert parts == [whole]


def test_items_and_bad_names():
  """Translation choice: 4 distinct choices, the right one among them, fixed by hashes;
  unknown names and languages are one-line errors."""
  items = multiple_choice.items("translation", "de", "validation")
  pairs = dict(__import__("xlingo.data.vocab", fromlist=["x"]).embedded_parallel("validation"))
  assert len(items) == len(pairs["de"])
  for it, (en, de) in zip(items, pairs["de"]):
    assert it.text == en and it.choices[it.gold] == de and len(set(it.choices)) == 4
  assert items == multiple_choice.items("translation", "de", "validation")
  with pytest.raises(ConfigError, match="not a multiple-choice task"):
    multiple_choice.items("sentiment", "de")
  with pytest.raises(DataError, match="no validation pairs en-xx"):
    multiple_choice.items("translation", "xx", "validation")


def test_core_never_imports_lm_eval():
  """Only the adaptor, its command and its tasks' docs import lm_eval / datasets."""
  allowed = {"lm_eval_adapter.py", "lm_eval.py", os.path.join("lm_eval_tasks", "utils.py")}
  for path in (ROOT / "xlingo").rglob("*.py"):
    rel = str(path.relative_to(ROOT / "xlingo"))
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) and node.module
               and node.level == 0 else [])
      if any(n.split(".")[0] in ("lm_eval", "datasets", "torch") for n in names):
        assert rel in allowed, f"{rel} imports {names}"


def test_lm_eval_command_without_the_extra(capsys):
  """Without lm-eval installed, python -m xlingo.lm_eval says how to install it, in one line."""
  if importlib.util.find_spec("lm_eval") is not None:
    pytest.skip("lm-eval is installed here")
  from xlingo import lm_eval as command

  with pytest.raises(SystemExit) as e:
    command.main(["--model", "xlingo", "--tasks", "xlingo_chapter"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pip install -e '.[eval]'" in err[0], err
