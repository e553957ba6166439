"""A Hugging Face tokenizer (``AutoTokenizer``, transformers' built-in classes only) with the methods of this
project's SentencePiece tokenizer (models.interface.Tokenizer), and its chat template."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from common.cli import UserError


class HFTokenizer:
    """An AutoTokenizer with ``llama.tokenizer.Tokenizer``'s methods.

    ``bos=True`` follows the tokenizer's own convention (``add_special_tokens``: Llama adds <s>, GPT-2,
    GPT-NeoX and Starcoder2 add nothing), which is how these models are used. ``bos_id`` is the token a
    document is scored after: BOS where the tokenizer has one, else EOS, as lm-evaluation-harness's
    ``prefix_token_id``."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = Path(folder)
        try:
            # never code shipped in a model folder (auto_map): transformers' built-in classes only
            self.tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as e:  # transformers raises many kinds for a damaged or foreign tokenizer
            raise UserError(f"{folder}: no usable tokenizer ({why_failed(e)})") from None
        if self.tok.eos_token_id is None:
            raise UserError(f"{folder}: the tokenizer has no end-of-sequence token")
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id
        # decoding removes the space before punctuation (" ." -> "."): a text stream holds trailing spaces back
        self.cleans_spaces = bool(getattr(self.tok, "clean_up_tokenization_spaces", False))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def sha256(self) -> str:
        files = sorted(p for p in self.path.glob("tokenizer*") if p.is_file())
        return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(
        self, texts: list[str], bos: bool = True, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        ids = self.tok(list(texts), add_special_tokens=bos)["input_ids"]
        return [list(x) + [self.eos_id] * eos for x in ids]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The folder's chat template (Jinja, which transformers renders in a sandboxed environment), if any."""
        return getattr(self.tok, "chat_template", None)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The token ids of ``messages`` rendered by the chat template, ready for the assistant's answer (the
        template writes the special tokens it wants, so none are added). A message's content is text, never
        markup, as in OpenAI's API: where it spells a special or added token ("<|system|>"), that spelling is
        tokenized as plain characters, so user text cannot open a turn of another role. Otherwise (nearly
        always) the ids are exactly transformers' ``apply_chat_template`` ones."""
        marks = {t.content for t in self.tok.added_tokens_decoder.values()} | set(self.tok.all_special_tokens)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and any(k and k in c for k in marks) for c in contents):
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        # Render with a placeholder per content, then tokenize the template's own text (its markers parsed)
        # and each content with special tokens split into plain characters.
        holders = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.tok.apply_chat_template(
            [m | {"content": h} for m, h in zip(messages, holders, strict=True)],
            add_generation_prompt=True,
            tokenize=False,
        )
        ids: list[int] = []
        pattern = "(" + "|".join(re.escape(h) for h in holders) + ")"
        for piece in re.split(pattern, rendered):
            if piece in holders:
                content = contents[holders.index(piece)]
                ids += self.tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece:
                ids += self.tok(piece, add_special_tokens=False)["input_ids"]
        return ids

    def special_text(self, i: int) -> str:
        """The text of one token, special ones included ("<s>", "<|endoftext|>")."""
        return self.tok.decode([int(i)], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens): exact for byte-level BPE (GPT-2, GPT-NeoX,
        Starcoder2) through the 256 characters standing for bytes, and for SentencePiece-style vocabularies
        (Llama: ``<0xNN>`` byte tokens, U+2581 for a space)."""
        from tokenizers.pre_tokenizers import ByteLevel

        decoder = json.loads(self.tok.backend_tokenizer.to_str()).get("decoder") or {}
        byte_level = '"ByteLevel"' in json.dumps(decoder)
        byte_chars = set(ByteLevel.alphabet())  # GPT-2's 256 printable stand-ins, one per byte
        special = set(self.tok.all_special_ids)
        pieces = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i, p in enumerate(pieces):
            if i in special or p is None:
                continue
            if byte_level and all(c in byte_chars for c in p):
                out[i] = len(p)  # one character per byte
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", p):
                out[i] = 1
            else:
                out[i] = len(p.replace("\u2581", " ").encode("utf-8"))
        return out


def why_failed(e: Exception) -> str:
    """A transformers error in a few words: remote code named as such, else the first line of its message."""
    text = str(e)
    if "trust_remote_code" in text:
        return "it asks to run code shipped in the folder (auto_map); this project never runs a model folder's code"
    return f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"
