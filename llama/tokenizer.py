"""SentencePiece BPE tokenizer with Llama-2's options: train on a corpus, load, encode, decode."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from common.cli import UserError
from common.files import atomic_write

# Llama-2's special ids: <unk>=0, <s>=1, </s>=2.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# SentencePiece writes spaces as U+2581 inside its pieces, so a literal U+2581 in the text would come back
# as a space. It is encoded as its three UTF-8 byte tokens instead, which decode to the character itself.
META_SPACE = "\u2581"
# SentencePiece skips training "sentences" longer than max_sentence_length bytes, so documents are cut into
# pieces of whole lines no longer than this; newlines stay inside a piece so "\n" and indentation get tokens.
TRAIN_CHUNK_CHARS = 4096


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file() or path.stat().st_size == 0:
            raise FileNotFoundError(f"tokenizer model {path} is missing or empty; train one with train_tokenizer()")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(
                f"tokenizer model {path} is unreadable ({str(e).splitlines()[0][:80]}); it is damaged or not a "
                "SentencePiece model: copy the run's tokenizer.model back, or train one"
            ) from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    cleans_spaces = False  # decoding keeps every space as the pieces spell it
    chat_template = None  # no chat format: the server answers /v1/chat/completions with a one-line error

    def chat_ids(self, messages: list[dict]) -> list[int]:
        raise UserError("this tokenizer has no chat template; use /v1/completions")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos, eos, num_threads=1)[0]

    def encode_batch(
        self, texts: list[str], bos: bool = True, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        ids = self.sp.encode(texts, num_threads=num_threads)
        for i, text in enumerate(texts):
            if META_SPACE in text:
                ids[i] = self._encode_with_meta_space(text)
        return [[self.bos_id] * bos + x + [self.eos_id] * eos for x in ids]

    def _encode_with_meta_space(self, text: str) -> list[int]:
        literal = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        parts = text.split(META_SPACE)
        out = self.sp.encode(parts[0])
        for part in parts[1:]:
            out += literal + self.sp.encode(part)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def special_text(self, i: int) -> str:
        """The text of one token, special ones included ("<s>", "</s>"), as a Hugging Face tokenizer decodes it."""
        return self.id_to_piece(i) if self.sp.is_control(int(i)) else self.decode([i])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each token stands for: 1 for a byte-fallback token, 0 for <unk>/<s>/</s>."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def _training_chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > TRAIN_CHUNK_CHARS:
                yield chunk
                chunk = ""
            chunk += line[:TRAIN_CHUNK_CHARS]
        if chunk:
            yield chunk
        seen += len(text)
        if seen >= max_chars:
            return


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    max_chars: int = 100_000_000,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train a byte-fallback BPE like Llama-2's (split digits, identity normalisation, whitespace kept).

    ``max_chars`` bounds the text read for training; the model file is written atomically to ``out_path``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_chunks(texts, max_chars),
            model_writer=proto,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.99995,
            byte_fallback=True,  # unseen characters become UTF-8 bytes, so encoding never loses text
            split_digits=True,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become single tokens
            remove_extra_whitespaces=False,
            # No "▁" is prepended to the text, so the pieces' bytes add up to exactly the text's bytes, which
            # bits-per-byte relies on. (Llama-2 prepends one; code has no use for it.)
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            max_sentence_length=4 * TRAIN_CHUNK_CHARS,  # bytes
            shuffle_input_sentence=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        m = re.search(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if m:
            raise UserError(
                f"vocab_size={m.group(1)} is larger than this corpus supports; use vocab_size <= {m.group(2)} "
                "or a larger corpus"
            ) from None
        raise
    atomic_write(out_path, proto.getvalue())
    return Tokenizer(out_path)
