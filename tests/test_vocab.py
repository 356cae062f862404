"""The shared SentencePiece vocabulary: shipped model, training, sampling, errors, CLI."""

import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from xlingo.config import EMBEDDED_LANGUAGES
from xlingo.data import vocab as vocab_lib

SENTENCES = {
    "en": "The package manager installs software from the Debian archive.",
    "de": "Der Paketmanager installiert Software aus dem Debian-Archiv.",
    "fr": "Le gestionnaire de paquets installe des logiciels depuis l'archive Debian.",
    "es": "El gestor de paquetes instala programas desde el archivo de Debian.",
    "it": "Il gestore dei pacchetti installa il software dall'archivio Debian.",
    "pt": "O gestor de pacotes instala programas a partir do arquivo Debian.",
    "ru": "Менеджер пакетов устанавливает программы из архива Debian.",
    "ja": "パッケージマネージャーは Debian アーカイブからソフトウェアをインストールします。",
    "zh": "软件包管理器从 Debian 档案库安装软件。",
}


def test_shipped_vocab_loads_in_seqio():
  vocab = vocab_lib.load_vocab()
  assert vocab.vocab_size == 8192
  assert vocab.pad_id == 0 and vocab.eos_id == 1 and vocab.unk_id == 2
  vocab_lib.check_vocab_matches(vocab, 8192)
  ids = vocab.encode(SENTENCES["de"])
  assert vocab.decode(ids) == SENTENCES["de"]


@pytest.mark.parametrize("lang", EMBEDDED_LANGUAGES)
def test_roundtrip_each_language(lang):
  sp = spm.SentencePieceProcessor(model_file=vocab_lib.embedded_vocab_path())
  ids = sp.EncodeAsIds(SENTENCES[lang])
  assert vocab_lib.UNK_ID not in ids
  assert sp.DecodeIds(ids) == SENTENCES[lang]


def test_byte_fallback_never_unknown():
  sp = spm.SentencePieceProcessor(model_file=vocab_lib.embedded_vocab_path())
  text = "Ελληνικά עברית 한국어 🙂"
  ids = sp.EncodeAsIds(text)
  assert vocab_lib.UNK_ID not in ids
  assert sp.DecodeIds(ids) == text


def test_sampling_rates_follow_temperature():
  counts = {"a": 10000, "b": 100, "c": 1}
  for t in (1.0, 3.33, 100.0):
    rates = vocab_lib.sampling_rates(counts, t)
    total = sum(n ** (1 / t) for n in counts.values())
    for lang, n in counts.items():
      assert rates[lang] == pytest.approx(n ** (1 / t) / total)
    assert sum(rates.values()) == pytest.approx(1.0)
  assert vocab_lib.sampling_rates(counts, 1.0)["a"] == pytest.approx(10000 / 10101)
  assert vocab_lib.sampling_rates(counts, 1e9)["c"] == pytest.approx(1 / 3)
  sample = vocab_lib.balanced_sample(
      {"big": [f"b{i}" for i in range(1000)], "small": ["s0", "s1", "s2"]}, 1e9, 100
  )
  assert len(sample["big"]) == 50 and len(set(sample["big"])) == 50  # subsampled
  assert len(sample["small"]) == 50 and set(sample["small"]) == {"s0", "s1", "s2"}  # repeated


def _tiny_corpus(tmp_path):
  files = {}
  for lang in ("en", "de", "ru"):
    src = os.path.join(vocab_lib.corpus_dir(), "mono", f"{lang}.validation.txt")
    with open(src, encoding="utf-8") as f:
      lines = f.read().splitlines()[:40]
    path = tmp_path / f"{lang}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    files[lang] = [str(path)]
  return files


def test_train_vocab_is_deterministic(tmp_path):
  files = _tiny_corpus(tmp_path)
  a = vocab_lib.train_vocab(files, str(tmp_path / "a" / "v"), vocab_size=400, seed=1)
  b = vocab_lib.train_vocab(files, str(tmp_path / "b" / "v"), vocab_size=400, seed=1)
  sp, sp_b = (spm.SentencePieceProcessor(model_file=m) for m in (a, b))
  # The files differ only in the recorded input/output paths; pieces and scores are identical.
  pieces = [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())]
  assert pieces == [(sp_b.IdToPiece(i), sp_b.GetScore(i)) for i in range(sp_b.GetPieceSize())]
  assert sp.GetPieceSize() == 400
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


def test_bad_inputs_raise_vocab_error(tmp_path):
  with pytest.raises(vocab_lib.VocabError, match="vocabulary file not found"):
    vocab_lib.load_vocab(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"this is not a model")
  with pytest.raises(vocab_lib.VocabError, match="not a SentencePiece model"):
    vocab_lib.load_vocab(str(junk))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n", encoding="utf-8")
  with pytest.raises(vocab_lib.VocabError, match="empty.txt: file is empty"):
    vocab_lib.read_lines(str(empty))
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  with pytest.raises(vocab_lib.VocabError, match="latin1.txt: not valid UTF-8"):
    vocab_lib.read_lines(str(latin1))

  class Fake:
    vocab_size = 8192

  with pytest.raises(
      vocab_lib.VocabError, match="vocabulary has 8192 pieces but the model expects 32000; "
  ):
    vocab_lib.check_vocab_matches(Fake(), 32000)


def test_parity_report_has_every_language():
  texts = {lang: [s] for lang, s in SENTENCES.items()}
  rows = vocab_lib.parity_report(
      vocab_lib.embedded_vocab_path(), texts, {"de": [(SENTENCES["en"], SENTENCES["de"])]}
  )
  assert [r["language"] for r in rows] == list(SENTENCES)
  en = rows[0]
  assert en["ratio_to_en"] == 1.0 and en["parallel_ratio"] == 1.0
  assert rows[1]["parallel_ratio"] > 0 and rows[2]["parallel_ratio"] is None
  assert all(r["unk"] == 0 and r["tokens_per_byte"] > 0 for r in rows)
  table = vocab_lib.format_parity_table(rows)
  assert len(table.splitlines()) == 2 + len(SENTENCES)


def test_cli_glob_matching_nothing_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "xlingo.data.vocab", "train", "--input",
       f"de={tmp_path}/nothing*.txt", "--output", str(tmp_path / "v")],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "matches no file" in lines[0] and "nothing*.txt" in lines[0]


def test_cli_bad_file_exits_2(tmp_path, capsys):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"\xff\xfe broken\n")
  code = vocab_lib.main(["train", "--input", f"en={bad}", "--output", str(tmp_path / "v")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "bad.txt: not valid UTF-8" in err[0]


def test_missing_vocab_names_the_config_key(tmp_path):
  with pytest.raises(vocab_lib.VocabError, match="point data.vocab_path at an existing .model"):
    vocab_lib.load_vocab(str(tmp_path / "missing.model"))


def test_remote_vocab_is_loaded_from_a_content_addressed_local_copy(tmp_path, monkeypatch):
  """A model on a remote store (gs://) is fetched through the path layer into a local file
  named by its content, which seqio and SentencePiece then read (they cannot reach every store
  the path layer can). The "remote" store here is a local directory the path layer is told to
  treat as remote."""
  import hashlib
  import tempfile

  from xlingo import paths

  bucket = tmp_path / "bucket"
  bucket.mkdir()
  data = open(vocab_lib.embedded_vocab_path(), "rb").read()
  (bucket / "v.model").write_bytes(data)
  real = paths.is_remote
  monkeypatch.setattr(paths, "is_remote", lambda p: os.fspath(p).startswith(str(bucket))
                      or real(p))
  monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  vocab = vocab_lib.load_vocab(str(bucket / "v.model"))
  assert vocab.encode(SENTENCES["de"]) == vocab_lib.load_vocab().encode(SENTENCES["de"])
  cached = tmp_path / "tmp" / "xlingo-cache" / (hashlib.sha1(data).hexdigest() + ".model")
  assert cached.read_bytes() == data
  assert vocab_lib.local_model(str(bucket / "v.model")) == str(cached)


def test_cli_output_whose_directory_cannot_be_made_is_one_line_before_training(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  src = tmp_path / "en.txt"
  src.write_text("one line of text\n")
  proc = subprocess.run(
      [sys.executable, "-m", "xlingo.data.vocab", "train", "--input", f"en={src}",
       "--output", str(blocker / "sub" / "v")],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "cannot create the directory" in lines[0] and "a_file" in lines[0]


def test_cli_extend_is_routed_to_vocab_extend():
  proc = subprocess.run([sys.executable, "-m", "xlingo.data.vocab", "extend", "--help"],
                        capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
  assert proc.returncode == 0 and "--new_pieces" in proc.stdout and "vocab extend" in proc.stdout
