"""Vocabulary extension: old ids kept, old languages unchanged, Greek cheaper, init sources."""

import glob
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from xlingo.data import vocab_extend as ve
from xlingo.errors import VocabError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "xlingo", "data", "corpus")
OLD = os.path.join(CORPUS, "vocab", "xlingo_8k.model")
EL_TRAIN = os.path.join(CORPUS, "new", "el.train.txt")
EL_VALID = os.path.join(CORPUS, "new", "el.validation.txt")
N = 512


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def _tokens_per_byte(sp, lines):
  return sum(len(x) for x in sp.EncodeAsIds(lines)) / sum(len(s.encode("utf-8")) for s in lines)


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("vocab_extend") / "xlingo_el")
  report = ve.extend_vocab(OLD, {"el": [EL_TRAIN]}, N, prefix)
  return report, prefix + ".model"


def test_old_ids_keep_their_pieces(extended):
  report, new_path = extended
  old, new = ve.load_model_proto(OLD), ve.load_model_proto(new_path)
  assert report["old_size"] == len(old.pieces) == 8192
  assert report["added"] == N and report["new_size"] == len(new.pieces) == 8192 + N
  for a, b in zip(old.pieces, new.pieces):
    assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
  assert old.normalizer_spec == new.normalizer_spec
  sp = spm.SentencePieceProcessor(model_file=new_path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.GetPieceSize() == 8192 + N
  # The .vocab file lists every piece in id order.
  vocab_lines = _lines(new_path[: -len(".model")] + ".vocab")
  assert [ln.split("\t")[0] for ln in vocab_lines] == [p.piece for p in new.pieces]


def test_old_languages_encode_to_the_same_ids(extended):
  _, new_path = extended
  old_sp = spm.SentencePieceProcessor(model_file=OLD)
  new_sp = spm.SentencePieceProcessor(model_file=new_path)
  texts = [ln for p in sorted(glob.glob(os.path.join(CORPUS, "mono", "*.validation.txt")))
           for ln in _lines(p)]
  texts += [col for p in sorted(glob.glob(os.path.join(CORPUS, "parallel", "*.validation.tsv")))
            for ln in _lines(p) for col in ln.split("\t")]
  assert len(texts) > 3000
  assert old_sp.EncodeAsIds(texts) == new_sp.EncodeAsIds(texts)


def test_greek_needs_far_fewer_tokens_per_byte(extended):
  _, new_path = extended
  valid = _lines(EL_VALID)
  before = _tokens_per_byte(spm.SentencePieceProcessor(model_file=OLD), valid)
  after = _tokens_per_byte(spm.SentencePieceProcessor(model_file=new_path), valid)
  assert before > 0.9  # almost every Greek byte is a byte-fallback token
  assert after < 0.4 * before
  sp = spm.SentencePieceProcessor(model_file=new_path)
  assert sp.DecodeIds(sp.EncodeAsIds(valid[0])) == valid[0]


def test_appended_pieces_are_ranked_and_all_used(extended):
  # Scores decide whether the unigram segmenter ever picks a piece: every appended piece must
  # be chosen somewhere in the text it was learned from.
  _, new_path = extended
  new = ve.load_model_proto(new_path)
  scores = [p.score for p in new.pieces[8192:]]
  assert scores == sorted(scores, reverse=True)
  assert min(scores) >= min(p.score for p in new.pieces[:8192] if p.type == 1)
  old_chars = ve.old_characters(ve.load_model_proto(OLD))
  assert all(set(p.piece) - old_chars for p in new.pieces[8192:])
  sp = spm.SentencePieceProcessor(model_file=new_path)
  used = {i for ids in sp.EncodeAsIds(_lines(EL_TRAIN)) for i in ids}
  assert set(range(8192, 8192 + N)) <= used


def test_init_sources_are_the_old_ids_of_each_piece(extended):
  _, new_path = extended
  sources = ve.new_piece_init_sources(OLD, new_path)
  assert sorted(sources) == list(range(8192, 8192 + N))
  old_sp = spm.SentencePieceProcessor(model_file=OLD)
  new_sp = spm.SentencePieceProcessor(model_file=new_path)
  for new_id, old_ids in sources.items():
    assert old_ids and all(0 <= i < 8192 and i not in (0, 1, 2) for i in old_ids)
    surface = b"".join(
        bytes([int(old_sp.IdToPiece(i)[3:5], 16)]) if old_sp.IsByte(i)
        else old_sp.IdToPiece(i).encode("utf-8")
        for i in old_ids
    )
    assert surface.decode("utf-8") == new_sp.IdToPiece(new_id), new_id
  with pytest.raises(VocabError, match=f"does not start with the {8192 + N} pieces"):
    ve.new_piece_init_sources(new_path, OLD)


def test_init_sources_refuse_a_model_that_moved_an_old_piece(extended, tmp_path):
  _, new_path = extended
  moved = ve.load_model_proto(new_path)
  a, b = moved.pieces[100], moved.pieces[8192]
  a.piece, b.piece = b.piece, a.piece
  path = tmp_path / "moved.model"
  path.write_bytes(moved.SerializeToString())
  with pytest.raises(VocabError, match="moved.model does not start with the 8192 pieces of"):
    ve.new_piece_init_sources(OLD, str(path))


def _small_greek(tmp_path, n=40):
  path = tmp_path / "el_small.txt"
  path.write_text("\n".join(_lines(EL_VALID)[:n]) + "\n", encoding="utf-8")
  return str(path)


def test_fewer_pieces_when_the_text_has_fewer(tmp_path):
  small = _small_greek(tmp_path)
  a = ve.extend_vocab(OLD, {"el": [small]}, 4000, str(tmp_path / "a"))
  assert 0 < a["added"] == a["candidates"] < 4000
  assert a["new_size"] == 8192 + a["added"]
  ve.extend_vocab(OLD, {"el": [small]}, 4000, str(tmp_path / "b"))
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_cli_writes_model_and_reports(tmp_path, capsys):
  small = _small_greek(tmp_path)
  out = str(tmp_path / "cli" / "ext")
  assert ve.main(["--vocab", OLD, "--input", f"el={small}", "--new_pieces", "64",
                  "--output", out]) == 0
  assert "added 64 of 64 pieces: 8192 -> 8256" in capsys.readouterr().out
  assert spm.SentencePieceProcessor(model_file=out + ".model").GetPieceSize() == 8256


def _cli_error(capsys, argv):
  with pytest.raises(SystemExit) as e:
    ve.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
  small = _small_greek(tmp_path)
  out = str(tmp_path / "out")
  base = ["--new_pieces", "8", "--output", out]
  err = _cli_error(capsys, ["--vocab", str(tmp_path / "none.model"), "--input", f"el={small}"]
                   + base)
  assert "none.model: vocabulary file not found" in err
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  err = _cli_error(capsys, ["--vocab", str(junk), "--input", f"el={small}"] + base)
  assert "junk.model: not a SentencePiece model" in err
  err = _cli_error(capsys, ["--vocab", OLD, "--input", f"el={tmp_path}/nothing*.txt"] + base)
  assert "matches no file" in err
  err = _cli_error(capsys, ["--vocab", OLD, "--input", small] + base)
  assert "must look like LANG=GLOB" in err
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("caf\xe9\n".encode("latin-1"))
  err = _cli_error(capsys, ["--vocab", OLD, "--input", f"el={latin1}"] + base)
  assert "latin1.txt: not valid UTF-8" in err
  err = _cli_error(capsys, ["--vocab", OLD, "--input", f"el={small}", "--new_pieces", "0",
                            "--output", out])
  assert "--new_pieces must be at least 1" in err
  err = _cli_error(capsys, ["--vocab", OLD, "--input", f"el={small}", "--new_pieces", "8",
                            "--output", OLD[: -len(".model")]])
  assert "would overwrite --vocab" in err
  assert not os.path.exists(out + ".model")
  with pytest.raises(VocabError, match="pieces='some'"):
    ve.extend_vocab(OLD, {"el": [small]}, 8, out, pieces="some")
  bpe = ve.load_model_proto(OLD)
  bpe.trainer_spec.model_type = bpe.trainer_spec.BPE
  (tmp_path / "bpe.model").write_bytes(bpe.SerializeToString())
  err = _cli_error(capsys, ["--vocab", str(tmp_path / "bpe.model"), "--input", f"el={small}"]
                   + base)
  assert "bpe.model: not a unigram model" in err
  bad_jsonl = tmp_path / "bad.jsonl"
  bad_jsonl.write_text('{"text": "Καλημέρα κόσμε"}\n\n{"txt": 1}\n', encoding="utf-8")
  err = _cli_error(capsys, ["--vocab", OLD, "--input", f"el={bad_jsonl}"] + base)
  assert 'bad.jsonl:3: not a JSON object with a "text" field' in err


def test_jsonl_input_reads_the_text_field(tmp_path):
  lines = _lines(EL_VALID)[:40]
  jsonl = tmp_path / "el.jsonl"
  jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)),
                   encoding="utf-8")
  assert ve.read_examples(str(jsonl)) == lines
  a = ve.extend_vocab(OLD, {"el": [str(jsonl)]}, 64, str(tmp_path / "j"))
  b = ve.extend_vocab(OLD, {"el": [_small_greek(tmp_path)]}, 64, str(tmp_path / "t"))
  assert a["added"] == b["added"] == 64
  assert (tmp_path / "j.model").read_bytes() == (tmp_path / "t.model").read_bytes()


def test_new_chars_only_versus_all_pieces(tmp_path):
  # Korean and English mixed text: "all" may add Latin pieces, "new_chars" never does.
  ko = os.path.join(CORPUS, "new", "en-ko.validation.tsv")
  mixed = tmp_path / "mixed.txt"
  mixed.write_text("\n".join(c for ln in _lines(ko) for c in ln.split("\t")) + "\n",
                   encoding="utf-8")
  old_chars = ve.old_characters(ve.load_model_proto(OLD))
  ve.extend_vocab(OLD, {"ko": [str(mixed)]}, 200, str(tmp_path / "all"), pieces="all")
  ve.extend_vocab(OLD, {"ko": [str(mixed)]}, 200, str(tmp_path / "nc"))
  added = {m: [p.piece for p in ve.load_model_proto(str(tmp_path / f"{m}.model")).pieces[8192:]]
           for m in ("all", "nc")}
  assert any(set(p) <= old_chars for p in added["all"])
  assert all(set(p) - old_chars for p in added["nc"])


@pytest.mark.slow
def test_module_entry_point_and_gs_paths(tmp_path, gcs_emulator):
  """``python -m xlingo.data.vocab_extend`` with --vocab, --input and --output on gs://."""
  bkt = gcs_emulator.bucket("vocab")
  env = dict(os.environ, PYTHONPATH=ROOT)
  small = _small_greek(tmp_path)
  upload = (
      "from xlingo import paths; import sys;"
      f"paths.copy_file(sys.argv[1], 'gs://{bkt}/v/old.model');"
      f"paths.copy_file(sys.argv[2], 'gs://{bkt}/text/el_a.txt')"
  )
  subprocess.run([sys.executable, "-c", upload, OLD, small], env=env, check=True, cwd=ROOT)
  argv = ["--vocab", f"gs://{bkt}/v/old.model", "--input", f"el=gs://{bkt}/text/el_*.txt",
          "--new_pieces", "32"]
  proc = subprocess.run(
      [sys.executable, "-m", "xlingo.data.vocab_extend", *argv, "--output",
       f"gs://{bkt}/out/ext"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"8192 -> 8224; wrote gs://{bkt}/out/ext.model" in proc.stdout
  download = "from xlingo import paths; import sys; paths.copy_file(sys.argv[1], sys.argv[2])"
  subprocess.run([sys.executable, "-c", download, f"gs://{bkt}/out/ext.model",
                  str(tmp_path / "gs.model")], env=env, check=True, cwd=ROOT)
  ve.extend_vocab(OLD, {"el": [small]}, 32, str(tmp_path / "local"))
  assert (tmp_path / "gs.model").read_bytes() == (tmp_path / "local.model").read_bytes()
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_same_vocabulary_with_another_model_size_names_the_size():
  """init_from with the checkpoint's own vocabulary file but model.vocab_size left at another
  value: the line names the size to set, not 'neither ... nor an extension'."""
  from configs import tiny
  from xlingo.data import vocab_facts
  from xlingo.errors import CheckpointError

  c = tiny.get_config()
  path, sha = vocab_facts.configured(c.data)
  meta = {"vocab_sha1": sha, "vocab_size": 320, "vocab_path": path}
  with pytest.raises(CheckpointError, match=r"set --config.model.vocab_size=320$"):
    ve.extension_sources(meta, c, "checkpoint.init_from W")
