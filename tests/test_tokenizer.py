import pytest

from llama.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer


def test_round_trip_is_lossless_on_the_default_corpus(small_tokenizer, stdlib_docs):
    sample = stdlib_docs[3::11]  # ~160 files the tokenizer was mostly not trained on
    assert len(sample) > 100
    failures = [d.name for d in sample if small_tokenizer.decode(small_tokenizer.encode(d.text)) != d.text]
    assert failures == []


def test_unseen_characters_fall_back_to_bytes(small_tokenizer):
    text = "  leading spaces,\ttabs\n\n\nunicode: ∑ é 漢字 🙂 and trailing  \n"
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert any(small_tokenizer.id_to_piece(i).startswith("<0x") for i in ids)


def test_bos_eos_and_digits(small_tokenizer):
    ids = small_tokenizer.encode("x = 12345", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    digits = [small_tokenizer.id_to_piece(i) for i in ids[1:-1] if small_tokenizer.id_to_piece(i).isdigit()]
    assert digits == list("12345")  # split_digits: one token per digit
    assert small_tokenizer.encode_batch(["a", "b c"], bos=False) == [
        small_tokenizer.encode("a", bos=False),
        small_tokenizer.encode("b c", bos=False),
    ]


def test_newlines_and_indentation_get_tokens(small_tokenizer):
    pieces = {small_tokenizer.id_to_piece(i) for i in range(small_tokenizer.vocab_size)}
    assert "\n" in pieces and any(set(p) == {"▁"} and len(p) >= 4 for p in pieces)


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=5000 is larger than this corpus supports; use vocab_size <="):
        train_tokenizer(["def f(x):\n    return x\n"] * 20, tmp_path / "t.model", vocab_size=5000)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing or empty"):
        Tokenizer(tmp_path / "none.model")


def test_token_bytes_add_up_to_the_text(small_tokenizer, stdlib_docs):
    table = small_tokenizer.token_bytes()
    for d in stdlib_docs[5::97]:
        ids = small_tokenizer.encode(d.text, bos=True, eos=True)
        assert table[ids].sum() == len(d.text.encode("utf-8")), d.name


def test_round_trip_is_exact_with_the_meta_space_character(small_tokenizer):
    # U+2581 is SentencePiece's stand-in for a space; a literal one in the text must survive a round trip
    for text in ["a\u2581b", "\u2581", " \u2581 x\u2581\u2581\n", "def f():\n    return '\u2581'\n"]:
        ids = small_tokenizer.encode(text, bos=True, eos=True)
        assert small_tokenizer.decode(ids) == text
        assert small_tokenizer.token_bytes()[ids].sum() == len(text.encode("utf-8"))
        assert small_tokenizer.encode_batch([text, "x"], bos=True, eos=True)[0] == ids
