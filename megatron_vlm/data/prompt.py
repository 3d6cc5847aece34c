"""Chat template (Nemotron Nano V2 style), media token expansion and the loss-target mask.

A chat sample is rendered as (``\\n`` = newline)::

    <SPECIAL_10>System\\n{system text}\\n
    <SPECIAL_11>User\\n{user text, media expanded}\\n
    <SPECIAL_11>Assistant\\n<think></think>{answer}\\n<SPECIAL_12>\\n
    ... more user / assistant turns ...

- The reasoning switch ``/think`` or ``/no_think`` lives in the system (or a user) message and is
  removed from the rendered text, as the released template does. The system header is always
  written, with empty text when there is no system message.
- An assistant turn without reasoning gets an empty ``<think></think>`` block; one with a
  ``reasoning`` field gets ``<think>\\n{reasoning}\\n</think>\\n`` before the answer.
- Targets (loss): the assistant body from the think block through the closing ``<SPECIAL_12>``
  (eos). The header ``<SPECIAL_11>Assistant\\n``, the newline after ``<SPECIAL_12>`` and all
  system/user tokens are not targets (Megatron-LM masks the same three header tokens).
- Each image becomes ``<img>`` + ``<image>`` x (tiles x tokens_per_tile) + ``</img>``; a video
  becomes ``This is a video:\\n`` then per frame
  ``Frame {i+1} sampled at {t:.2f} seconds: <img>`` + ``<image>`` x tokens_per_tile +
  ``</img>\\n``.
- A ``text`` sample (plain document, e.g. code) is its tokens + eos, all of them targets.

Pieces are tokenized separately and concatenated; the pieces meet at special tokens or
newlines, where a byte-level BPE would split anyway. Text never produces a special token: a
literal ``<image>``, ``<img>``, ``<SPECIAL_11>``... inside content (a code file, a web page) is
tokenized as ordinary characters, so ``<image>`` ids always match the tiles one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from megatron_vlm.media_format import num_kept_tokens, provisional_frame_counts

from .schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .tokenizer import (
    CHAT_MARKERS,
    END_OF_TURN,
    SYSTEM_MARKER,
    THINK_END,
    THINK_START,
    TURN_MARKER,
    VLM_SPECIAL_TOKENS,
    VLMTokenizer,
)

_MEDIA_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
# Special-token strings that must not be recognised inside content.
_PROTECTED = re.compile("|".join(re.escape(t) for t in sorted(VLM_SPECIAL_TOKENS + CHAT_MARKERS, key=len, reverse=True)))


@dataclass
class EncodedSample:
    """One sample as tokens. `targets[i]` is True when token i is predicted (in the loss)."""

    tokens: np.ndarray  # int64 [L]
    targets: np.ndarray  # bool [L]
    tiles_per_media: list[int]  # tiles of each image/video, in token order
    last_media_token: int  # index of the last </img> (-1 if no media): truncation must keep it
    media_tokens: list[int] = field(default_factory=list)  # <image> tokens of each media (after EVS)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_media)


def strip_reasoning_flags(text: str) -> str:
    return text.replace("/no_think", "").replace("/think", "")


def reasoning_enabled(conversation: list[dict], default: bool = False) -> bool:
    """The /think or /no_think switch of a conversation (the last one found wins)."""
    enabled = default
    for turn in conversation:
        if turn["role"] in ("system", "user"):
            if "/no_think" in turn["content"]:
                enabled = False
            elif "/think" in turn["content"]:
                enabled = True
    return enabled


class PromptEncoder:
    """Turns sample metadata (see schema.py) into an EncodedSample."""

    def __init__(self, tokenizer: VLMTokenizer, tokens_per_tile: int):
        self.tok = tokenizer
        self.tokens_per_tile = tokens_per_tile
        enc = tokenizer.encode
        for marker in CHAT_MARKERS:  # the template needs them as single tokens
            tokenizer.token_id(marker)
        self._system_header = enc(f"{SYSTEM_MARKER}System\n")
        self._user_header = enc(f"{TURN_MARKER}User\n")
        self._assistant_header = enc(f"{TURN_MARKER}Assistant\n")
        self._empty_think = enc(f"{THINK_START}{THINK_END}")
        self._end_of_turn = enc(f"\n{END_OF_TURN}")
        self._newline = enc("\n")
        self._video_intro = enc("This is a video:\n")
        self._img_start, self._img_end = tokenizer.img_start_id, tokenizer.img_end_id

    def encode_plain(self, text: str) -> list[int]:
        """Tokens of content text, with special-token strings kept as ordinary text."""
        if not _PROTECTED.search(text):
            return self.tok.encode(text)
        pieces, last = [], 0
        for m in _PROTECTED.finditer(text):
            # "<image>" -> "<" + "image>": encoded apart, the special token cannot match
            pieces += [text[last : m.start()], m.group()[:1], m.group()[1:]]
            last = m.end()
        pieces.append(text[last:])
        return [t for ids in self.tok.encode_many([p for p in pieces if p]) for t in ids]

    # ---- pieces -----------------------------------------------------------------------------
    def _image_ids(self, tiles: int, num_tokens: int | None = None) -> list[int]:
        n = tiles * self.tokens_per_tile if num_tokens is None else num_tokens
        return [self._img_start] + [self.tok.image_id] * n + [self._img_end]

    def _video_ids(self, timestamps: list[float], frame_tokens: list[int] | None = None) -> list[int]:
        ids = list(self._video_intro)
        for i, t in enumerate(timestamps):
            ids += self.tok.encode(f"Frame {i + 1} sampled at {t:.2f} seconds: ")
            ids += self._image_ids(1, None if frame_tokens is None else frame_tokens[i])
            ids += self._newline
        return ids

    def _text_with_media(self, text: str, media: list[dict], media_cursor: list[int],
                         tiles_per_media: list[int], media_tokens: list[int] | None = None) -> list[int]:
        media_tokens = [] if media_tokens is None else media_tokens
        ids: list[int] = []
        for part in _MEDIA_SPLIT.split(text):
            if part == IMAGE_PLACEHOLDER or part == VIDEO_PLACEHOLDER:
                item = media[media_cursor[0]]
                media_cursor[0] += 1
                expected = "image" if part == IMAGE_PLACEHOLDER else "video"
                if item["type"] != expected:
                    raise ValueError(f"placeholder {part} met media of type {item['type']}")
                if expected == "image":
                    n = len(item["tiles"])
                    ids += self._image_ids(n)
                    kept = n * self.tokens_per_tile
                else:
                    n = len(item["frames"])
                    rate = float(item.get("evs_rate", 0.0))
                    kept = num_kept_tokens(n, self.tokens_per_tile, rate) if rate > 0 else n * self.tokens_per_tile
                    counts = provisional_frame_counts(n, self.tokens_per_tile, kept)
                    ids += self._video_ids([float(f["t"]) for f in item["frames"]], counts)
                tiles_per_media.append(n)
                media_tokens.append(kept)
            elif part:
                ids += self.encode_plain(part)
        return ids

    # ---- samples ----------------------------------------------------------------------------
    def encode(self, meta: dict) -> EncodedSample:
        if meta["kind"] == "text":
            return self.encode_text(meta["text"])
        return self.encode_chat(meta["conversation"], meta.get("media", []))

    def encode_text(self, text: str) -> EncodedSample:
        ids = self.encode_plain(text) + [self.tok.eos_id]
        tokens = np.asarray(ids, dtype=np.int64)
        return EncodedSample(tokens, np.ones(len(ids), dtype=bool), [], -1)

    def encode_chat(self, conversation: list[dict], media: list[dict] | None = None,
                    add_generation_prompt: bool = False) -> EncodedSample:
        """Render + tokenize; with add_generation_prompt, end with the assistant header and the
        think opener (``<think></think>`` or ``<think>\\n`` per the reasoning switch) for generation."""
        media = media or []
        pieces: list[tuple[list[int], bool]] = []  # (ids, are targets)
        cursor, tiles_per_media, media_tokens = [0], [], []
        last_media_end = -1
        length = 0

        def add(ids: list[int], target: bool = False):
            nonlocal length
            pieces.append((ids, target))
            length += len(ids)

        turns = list(conversation)
        system_text = ""
        if turns and turns[0]["role"] == "system":
            system_text = turns.pop(0)["content"]
        add(self._system_header)
        add(self._text_with_media(strip_reasoning_flags(system_text).strip(), media, cursor, tiles_per_media,
                                  media_tokens))
        if tiles_per_media:
            last_media_end = length - 1
        add(self._newline)
        for turn in turns:
            role, content = turn["role"], turn["content"]
            if role in ("user", "system"):
                n_media_before = len(tiles_per_media)
                add(self._user_header)
                body = self._text_with_media(strip_reasoning_flags(content).strip(), media, cursor, tiles_per_media,
                                             media_tokens)
                add(body)
                if len(tiles_per_media) > n_media_before:
                    # position of the last </img> within this body
                    last_media_end = length - 1 - body[::-1].index(self._img_end)
                add(self._newline)
            elif role == "assistant":
                add(self._assistant_header)
                reasoning = (turn.get("reasoning") or "").strip()
                if reasoning:
                    add(self.tok.encode(f"{THINK_START}\n") + self.encode_plain(reasoning)
                        + self.tok.encode(f"\n{THINK_END}\n"), True)
                else:
                    add(self._empty_think, True)
                add(self.encode_plain(content.strip()), True)
                add(self._end_of_turn, True)
                add(self._newline)
            else:
                raise ValueError(f"unknown role {role!r}")
        if cursor[0] != len(media):
            raise ValueError(f"{len(media)} media items but {cursor[0]} placeholders")
        if add_generation_prompt:
            add(self._assistant_header)
            if reasoning_enabled(conversation):
                add(self.tok.encode(f"{THINK_START}\n"))
            else:
                add(self._empty_think)
        tokens = np.fromiter((t for ids, _ in pieces for t in ids), dtype=np.int64, count=length)
        targets = np.zeros(length, dtype=bool)
        pos = 0
        for ids, is_target in pieces:
            if is_target:
                targets[pos : pos + len(ids)] = True
            pos += len(ids)
        return EncodedSample(tokens, targets, tiles_per_media, last_media_end, media_tokens)

    def generation_prompt(self, conversation: list[dict], media: list[dict] | None = None) -> list[int]:
        """Token ids to feed for generation: the conversation up to a final user turn, plus the
        assistant header and think opener. A trailing assistant turn (the reference answer) is dropped."""
        turns = list(conversation)
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        return self.encode_chat(turns, media, add_generation_prompt=True).tokens.tolist()
