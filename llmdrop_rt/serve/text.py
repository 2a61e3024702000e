"""A continuation's text as its tokens arrive, cut before the first stop string."""
from __future__ import annotations

from ..io.tokenizer import Tokenizer


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred."""
    hits = [text.index(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


class TextStream:
    """Streamed text never shows what may still turn out to be a stop string (a suffix that begins one) or an
    incomplete UTF-8 character; `finish` returns the rest."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.shown = 0  # characters already returned

    def stop_reached(self, ids: list[int]) -> bool:
        """The engine's stop test on the tokens generated so far."""
        return cut_at_stop(self.tokenizer.decode(ids), self.stops)[1]

    def push(self, token: int) -> str:
        self.ids.append(token)
        text, stopped = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)
        safe = len(text) if stopped else len(text) - self._undecided_tail(text)
        return self._show(text[:safe])

    def finish(self) -> str:
        return self._show(self.text())

    def text(self) -> str:
        return cut_at_stop(self.tokenizer.decode(self.ids), self.stops)[0]

    def _show(self, text: str) -> str:
        piece = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return piece

    def _undecided_tail(self, text: str) -> int:
        tail = len(text) - len(text.rstrip("\ufffd"))
        body = text[:len(text) - tail]
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(body)), 0, -1):
                if body.endswith(stop[:size]):
                    tail = max(tail, len(text) - len(body) + size)
                    break
        return tail
