"""A completion's text as its tokens arrive (``TextStream``: incremental detokenizing, stop strings and broken
characters held back) and each token's log-probabilities, released only with the text they belong to."""

from __future__ import annotations

import torch

from runtime.generate import cut_at_stops


class TextStream:
    """The text of one completion as its tokens arrive. ``push`` returns what may be sent now; ``finish`` the
    rest. Held back until the next token: a stop string's possible beginning (the text ends before a stop
    string and the stream must never show part of one), an incomplete UTF-8 character (decoded as U+FFFD) and,
    with a tokenizer that cleans up spaces when it decodes (``hold_space``: " ." becomes "."), trailing
    whitespace. So the pieces always add up to exactly the text a non-streaming request returns.

    Decoding is incremental, as vLLM's ``detokenize_incrementally`` does it: each new token is decoded after the
    tokens of the previous step as context, and the new text is what that adds to the context's own text; the
    whole completion is never decoded again per token (which made a long completion quadratic)."""

    def __init__(self, decode, stops: list[str], hold_space: bool = False):
        self.decode, self.stops, self.hold_space = decode, stops, hold_space
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read], settled
        self.prefix = self.read = 0  # ids[prefix:read]: the context the next tokens are decoded after
        self.sent = ""
        self.hit = False

    def _advance(self, final: bool) -> str:
        """Settle the text of the tokens past ``read`` when it decodes to whole characters (or at the end); the
        text so far, with an unsettled tail at the end."""
        context = self.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        now = self.decode(self.ids[self.prefix :])
        if not now.startswith(context):  # the context decodes otherwise with what follows: decode it all once
            self.text, self.prefix, self.read = self.decode(self.ids), len(self.ids), len(self.ids)
            return self.text
        tail = now[len(context) :]
        if final or (tail and not tail.endswith("\ufffd")):
            self.text += tail
            self.prefix, self.read = self.read, len(self.ids)
            return self.text
        return self.text + tail

    def _visible(self, final: bool) -> str:
        text = self._advance(final)
        if not final:  # an incomplete character (its bytes so far read U+FFFD) is no text yet: no stop matches it
            text = text.rstrip("\ufffd")
        cut = cut_at_stops(text, self.stops)
        self.hit = len(cut) < len(text)  # a stop string has appeared: the decoding stops here
        if final or self.hit:
            return cut
        keep = len(text)
        for s in self.stops:  # the longest end of the text that begins a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = min(keep, len(text) - k)
                    break
        text = text[:keep].rstrip("\ufffd")
        return text.rstrip() if self.hold_space else text

    def _delta(self, visible: str) -> str:
        if not visible.startswith(self.sent):
            return ""  # the decoding of what was sent changed: wait until it is stable again
        delta, self.sent = visible[len(self.sent) :], visible
        return delta

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(self._visible(False))

    def finish(self) -> str:
        final = self._visible(True)
        whole = cut_at_stops(self.decode(self.ids), self.stops)  # once per completion: the text is the decode's
        if whole != final and whole.startswith(self.sent):
            final = whole
        if not final.startswith(self.sent):
            raise RuntimeError("the streamed text is not a prefix of the completion's text")
        return self._delta(final)

    @property
    def settled(self) -> int | None:
        """The length of the text of every token so far, where it is settled (no character still missing bytes);
        before stop strings are cut."""
        return len(self.text) if self.read == len(self.ids) else None

    def stopped(self) -> bool:
        """Whether a stop string ended the text."""
        text = self.decode(self.ids)
        return len(cut_at_stops(text, self.stops)) < len(text)


def token_text(tok, before: list[int], token: int) -> str:
    """What ``token`` adds to the text of ``before`` (a token's own text can depend on what precedes it)."""
    before = before[-8:]  # enough context for how a token joins the text, at a cost that does not grow
    a, b = tok.decode(before), tok.decode(before + [token])
    return b[len(a) :] if b.startswith(a) else tok.decode([token])


def logprob_entry(tok, before: list[int], token: int, logits: torch.Tensor, top: int) -> dict:
    lp = torch.log_softmax(logits.float(), -1)
    alts = torch.topk(lp, top) if top else None
    return {
        "token": token_text(tok, before, token),
        "logprob": float(lp[token]),
        "top": []
        if alts is None
        else [(token_text(tok, before, int(i)), float(v)) for v, i in zip(alts.values, alts.indices, strict=True)],
    }


class LogprobsHeld:
    """Log-probabilities of tokens whose text is not sent yet, released only once all of a token's text has been
    sent, so that logprobs never run past the text a client gets: a token the stop string cuts into is never
    released, nor a token of a held-back stop string's beginning. Each token's place in the text comes from the
    text stream's settled decode (``settle``), not from the length of its own text: the byte pieces of one
    character each read as U+FFFD on their own, and counting those once drifted every later position (the last
    tokens then never came out, and text_offset shifted). Each entry released carries ``offset``: where its text
    begins in the completion's text."""

    def __init__(self):
        self.pending: list[list] = []  # [start, end or None (its text not settled yet), entry]
        self.chars = 0  # where the next token's text begins: the end of the text settled so far

    def add(self, entry: dict):
        self.pending.append([self.chars, None, entry])

    def settle(self, settled_chars: int | None):
        """The text of every token so far is settled and ``settled_chars`` long (None: some bytes of a character
        are still to come): the tokens not placed yet end there."""
        if settled_chars is None:
            return
        for item in self.pending:
            if item[1] is None:
                item[1] = settled_chars
        self.chars = settled_chars

    def release(self, sent_chars: int) -> list[dict]:
        out = []
        while self.pending and self.pending[0][1] is not None and self.pending[0][1] <= sent_chars:
            start, _, entry = self.pending.pop(0)
            out.append(entry | {"offset": start})
        return out
