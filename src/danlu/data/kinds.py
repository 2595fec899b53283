"""What kind of data a record is, where that is not supervised fine-tuning (SFT) data.

Pure functions on a record's raw ``data`` (a dict), no files and no tokenizer. SFT trains
chats and text; a record of another kind must never be trained as one:

- preference pairs, ``chosen`` + ``rejected`` (with ``prompt``, ``messages`` or
  ``conversations``): format ``preference``, for ``train.objective: dpo``, ``orpo`` or ``simpo``;
- KTO, a ``label`` (true: a desirable reply) with ``messages``, ``conversations`` or
  ``prompt`` + ``completion``: format ``kto``, for ``train.objective: kto``;
- images, audio and video (an ``images`` / ``videos`` / ``audios`` list, ``<image>`` markers in
  the text, or a content part of such a type): danlu trains on text only, so such records are
  refused with file and line rather than trained as text without what they refer to.
"""

from __future__ import annotations

import re
from typing import Any

PREFERENCE, KTO = "preference", "kto"
NOT_SFT = (PREFERENCE, KTO)

# Record-level fields that carry media (LLaMA-Factory, ShareGPT-4V, TRL's vision sets) and the
# markers those formats put into the text where each item goes.
MEDIA_FIELDS = ("images", "image", "videos", "video", "audios", "audio")
_MARKER = re.compile(r"<(image|video|audio)>")
# Content-part types that are not text (OpenAI: image_url, input_audio, file; others: image, ...).
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")
_NOT_YET = "danlu does not train on images, audio or video yet"
_SKIP = "remove the media, or leave such records out (data.on_error=skip)"


def is_preference(data: Any) -> bool:
    """A preference pair: ``chosen`` and ``rejected`` replies to one prompt."""
    return isinstance(data, dict) and "chosen" in data and "rejected" in data


def is_kto(data: Any) -> bool:
    """A KTO record: one reply (last assistant turn, or ``completion``) with a true/false (or
    1/0) ``label``. Another label (a topic such as ``"math"``) leaves a chat SFT data."""
    if not isinstance(data, dict) or not (
        "messages" in data or "conversations" in data or "completion" in data
    ):
        return False
    label = data.get("label")
    return isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))


def kind(data: Any) -> str | None:
    """``preference``, ``kto``, or None for records SFT may read."""
    if is_preference(data):
        return PREFERENCE
    if is_kto(data):
        return KTO
    return None


def sft_refusal(fmt: str) -> str:
    """One sentence for a record of kind ``fmt`` met by SFT: what it is and what trains it."""
    if fmt == PREFERENCE:
        return (
            "this is preference data (chosen/rejected pairs), not SFT data: train it with "
            "train.objective: dpo, orpo or simpo"
        )
    return (
        "this is KTO data (replies labelled desirable or not), not SFT data: SFT would train the "
        "bad replies too; train it with train.objective: kto"
    )


def media_field(data: Any) -> str | None:
    """Why a record that carries media is refused, or None. Checks record-level fields only."""
    if not isinstance(data, dict):
        return None
    for key in MEDIA_FIELDS:
        value = data.get(key)
        if value not in (None, "", [], {}):
            return f"the record has {key!r} ({_count(value)}); {_NOT_YET}: {_SKIP}"
    return None


def media_marker(text: str) -> str | None:
    """Why text with an ``<image>``-style marker is refused, or None."""
    found = _MARKER.search(text)
    if found is None:
        return None
    return (
        f"the text holds a {found.group(0)} marker, which stands for media the record refers to; "
        f"{_NOT_YET}: {_SKIP}"
    )


def media_part(kind_name: str) -> str:
    """Why a content part of type ``kind_name`` is refused."""
    return f"is a part of type {kind_name!r}, not text; {_NOT_YET}: {_SKIP}"


def _count(value: Any) -> str:
    return f"{len(value)} item{'s' if len(value) != 1 else ''}" if isinstance(value, list) else "1 item"
