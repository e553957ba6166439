import pytest

from eval.text_metrics import score_texts


def test_bleu_by_hand():
    # one substituted word out of 8: n-gram precisions 7/8, 6/7, 5/6, 4/5, no brevity penalty;
    # BLEU = 100 * (7/8 * 6/7 * 5/6 * 4/5) ** (1/4) = 100 * 0.5 ** 0.25
    s = score_texts(["a b c d e f g x"], ["a b c d e f g h"])
    assert s["bleu"] == pytest.approx(100 * 0.5**0.25, abs=1e-6)
    assert score_texts(["the very same text here"], ["the very same text here"])["bleu"] == pytest.approx(100.0)


def test_rouge_by_hand():
    # unigrams: 2 of 3 shared -> P = R = F = 2/3; bigrams: 1 of 2 ("the cat") -> F = 1/2; LCS = 2 -> F = 2/3
    s = score_texts(["the cat sat"], ["the cat ran"])
    assert s["rouge1"] == pytest.approx(200 / 3)
    assert s["rouge2"] == pytest.approx(50.0)
    assert s["rougeL"] == pytest.approx(200 / 3)
    # mean over pairs: a perfect pair and a disjoint pair average to 50
    assert score_texts(["x y", "p q"], ["x y", "r s"])["rouge1"] == pytest.approx(50.0)


def test_chrf_extremes_and_order():
    assert score_texts(["def add(a, b):"], ["def add(a, b):"])["chrf"] == pytest.approx(100.0)
    close = score_texts(["def add(a, b):"], ["def add(x, y):"])["chrf"]
    far = score_texts(["zzzz"], ["def add(x, y):"])["chrf"]
    assert 0 <= far < close < 100


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        score_texts(["a"], ["a", "b"])


def test_code_rouge_sees_operators_brackets_and_non_latin_text():
    # rouge-score's default tokenizer keeps only lowercase [a-z0-9] runs: a+b and a-b look identical to it,
    # and text without Latin letters has no tokens at all. The *_code scores keep every symbol.
    s = score_texts(["return a + b"], ["return a - b"])
    assert s["rougeL"] == pytest.approx(100.0) and s["rougeL_code"] == pytest.approx(75.0)
    s = score_texts(["x = 漢字"], ["x = 漢字"])
    assert s["rouge1_code"] == pytest.approx(100.0)
    assert s["rouge1"] == pytest.approx(100.0)  # only "x" survives the default tokenizer
    assert score_texts(["漢字"], ["仮名"])["rouge1"] == 0 and score_texts(["漢字"], ["漢字"])["rouge1_code"] == 100
    assert "a-z0-9" in s["rouge_tokenizers"]["default"]
