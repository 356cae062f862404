"""The one translation scorer (scoring.score_translations): tokenizer per target language,
MeCab for Japanese, and the sacrebleu signature with every score."""

import math

import pytest
import sacrebleu

from xlingo import scoring

HYPS = {"ja": ["猫がマットの上に座った。", "今日は良い天気です。"],
        "zh": ["猫坐在垫子上。", "今天天气很好。"],
        "de": ["Die Katze saß auf der Matte.", "Heute ist gutes Wetter."]}
REFS = {"ja": ["猫がマットの上に座っていた。", "今日はいい天気です。"],
        "zh": ["猫坐在了垫子上。", "今天天气不错。"],
        "de": ["Die Katze sass auf der Matte.", "Heute ist schönes Wetter."]}


@pytest.mark.parametrize("lang,tok", [("ja", "ja-mecab"), ("zh", "zh"), ("de", "13a")])
def test_scores_and_signatures(lang, tok):
  got = scoring.score_translations(HYPS[lang], REFS[lang], lang)
  want = sacrebleu.corpus_bleu(HYPS[lang], [REFS[lang]], tokenize=tok).score
  assert got["bleu"] == pytest.approx(want) and 0 < got["bleu"] < 100
  assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS[lang], [REFS[lang]]).score)
  assert f"tok:{tok}" in got["bleu_signature"]
  assert "version:" in got["bleu_signature"] and "nc:6" in got["chrf_signature"]


def test_japanese_is_cut_into_words_not_characters():
  """MeCab (sacrebleu[ja], a dependency) is there: Japanese BLEU is not character BLEU."""
  got = scoring.score_translations(HYPS["ja"], REFS["ja"], "ja")["bleu"]
  char = sacrebleu.corpus_bleu(HYPS["ja"], [REFS["ja"]], tokenize="char").score
  assert got != pytest.approx(char)


def test_nothing_to_score_keeps_the_signature():
  got = scoring.score_translations([], [], "ja")
  assert math.isnan(got["bleu"]) and "tok:ja-mecab" in got["bleu_signature"]
