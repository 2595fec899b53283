"""A reasoning model's reply split into its reasoning and its answer, as the text streams in.

Reasoning models (Qwen3, DeepSeek-R1, QwQ and the like) write ``<think>...</think>`` before the
answer, or their chat template opens the ``<think>`` block in the prompt and the reply starts
inside it. :class:`ReasoningSplitter` takes the reply piece by piece (a tag may arrive split over
several pieces) and hands back reasoning and answer text separately, so front ends can show the
reasoning apart (OpenAI-style ``reasoning_content``) or hide it. A reply without a leading
``<think>`` block is all answer.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` block (the template opened it,
    so the reply starts with reasoning)."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed a reply's text; get ``(reasoning, answer)`` pieces back.

    ``inside``: the prompt already opened the ``<think>`` block. The whitespace around the tags
    is dropped, so an empty block (``<think>\\n\\n</think>\\n\\n``, Qwen3 with thinking off)
    gives no reasoning and an answer that starts at its first character.
    """

    def __init__(self, inside: bool = False) -> None:
        self.state = "reasoning" if inside else "start"
        self.buffer = ""
        self.saw_reasoning = inside
        self._started = False  # some reasoning text was handed out

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and answer text that ``text`` completes (either may be empty)."""
        self.buffer += text
        reasoning = answer = ""
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(OPEN):
                    self.buffer, self.state, self.saw_reasoning = head[len(OPEN) :], "reasoning", True
                    continue
                if OPEN.startswith(head):  # nothing yet, or the tag's first characters: wait
                    return reasoning, answer
                self.state = "answer"
            if self.state == "reasoning":
                at = self.buffer.find(CLOSE)
                if at < 0:
                    keep = _partial_tail(self.buffer, CLOSE)
                    ready = self.buffer[: len(self.buffer) - keep]
                    if not self._started:
                        ready = ready.lstrip()  # the newline after <think>
                    self._started = self._started or bool(ready)
                    reasoning += ready
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return reasoning, answer
                ready = self.buffer[:at] if self._started else self.buffer[:at].lstrip()
                reasoning += ready.rstrip()
                self.buffer, self.state = self.buffer[at + len(CLOSE) :], "gap"
                continue
            if self.state == "gap":  # whitespace between </think> and the answer
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return reasoning, answer
                self.state = "answer"
            answer += self.buffer
            self.buffer = ""
            return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end of the reply (an unclosed block's end is reasoning)."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest if self.state != "gap" else ""


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """A whole reply as ``(reasoning, answer)``; reasoning is None when there was none (no
    block, or an empty one) and has its surrounding whitespace removed."""
    splitter = ReasoningSplitter(inside)
    r1, a1 = splitter.feed(text)
    r2, a2 = splitter.flush()
    reasoning = (r1 + r2).strip()
    return (reasoning or None), a1 + a2
