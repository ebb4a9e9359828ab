"""Stop strings, handled in exactly one place for eval, chat and serve.

``StopFilter`` cuts text at the first stop string and, while streaming, holds back any
tail that could still become one; ``template_stops`` gives the stop strings a
hand-written template implies.
"""

from __future__ import annotations

from typing import Sequence


class StopFilter:
    """Cuts text at the first stop string; while streaming, holds back possible prefixes.

    ``feed(piece)`` returns the text that is safe to show now and whether a stop string
    was hit; ``flush()`` returns what was held back once generation ended without one.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    stop_filter = StopFilter(stops)
    stop_filter.feed(text)
    return stop_filter.text, stop_filter.stopped


def template_stops(tokenizer) -> tuple[str, ...]:
    """Stop strings implied by a hand-written template (e.g. ``\\nHuman:`` for human-assistant).

    A base model prompted through such a template tends to write the next turn itself;
    the tokenizer's own templates end answers with eos and need none.
    """
    from tunelab.models.templates import STOP_STRINGS, TEMPLATES

    template = getattr(tokenizer, "chat_template", None)
    for name, source in TEMPLATES.items():
        if template == source:
            return tuple(STOP_STRINGS.get(name, ()))
    return ()
