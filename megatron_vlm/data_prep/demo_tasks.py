"""Generators of the demo corpus: small tasks a tiny model learns in minutes on CPU.

Every generator is ``make_<task>(rng, n, image_dir, prefix) -> list[record]``; records follow
megatron_vlm/data_prep/records.py plus ``task`` and ``answer`` (the exact string a correct model generates,
used by evaluation by generation). Images are small PNGs written to ``image_dir`` and referenced
relative to the task folder (``images/NAME.png``).

The formats are few and regular on purpose: a 64 px tile is 4 image tokens of the tiny model, so
each visual task puts what matters where one or a few tokens see it, and answers are one token
from a small closed set, so that minutes of CPU training show each stage's ability in the table.
``CHANCE`` is each task's accuracy by guessing uniformly among its answers.

Tasks:
- ocr: one large digit on a 64 px tile; read it (chance 1/10).
- chart: four bars of four colours; name the colour of the tallest (1/4).
- table: a one-row table of two digits; read the left or the right cell (1/10).
- multi_image: two tiles of different colours; name the colour of the first or second (1/6).
- video: encoded clips (H.264 / VP9, 4-8 s, mixed frame rates, one variable) of a ball
  crossing a static background; name its direction (1/4).
- text: instructions with one-token answers: repeat a word, first letter of a word, the number
  after a number (open answers: chance 0).
- code: chunks of the running interpreter's standard library, as plain ``text`` documents; eval
  asks for the next line of a held-out chunk (chance 0).
- needle / needle_short: a long (~800 tokens) or short (~150 tokens) filler document hiding one
  secret word; ask for it (1/16). Only Stage 4 trains on needles.
"""

from __future__ import annotations

import os
import random
import sysconfig
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf")
NO_THINK = "/no_think"

WORDS = """apple river stone cloud green happy window garden light music paper table chair
orange silver bridge forest candle winter summer ocean planet rocket yellow purple friend
market castle dragon pencil button jacket ladder mirror needle pillow rabbit saddle tiger
violin wagon zebra anchor basket carpet desert engine falcon guitar harbor island jungle
kettle lemon magnet nickel oyster parrot quartz ribbon shadow tunnel umbrella valley walnut
yogurt copper marble meadow cactus cobalt comet crystal daisy ember feather glacier hammer
lantern maple nectar orbit pepper puzzle raven sapphire spiral thunder velvet willow""".split()
NOUNS = """cat dog bird fox horse farmer teacher sailor baker child robot train boat lamp
tree house road cup book clock door hill lake ship key coin map box""".split()
ADJECTIVES = """quiet small old bright quick lazy brave calm tall round soft heavy young wise
dusty shiny narrow gentle""".split()
VERBS = """watched followed painted found carried opened cleaned visited moved counted
passed lifted""".split()
PLACES = """station market harbor library garden kitchen valley tower bridge square
forest school""".split()
COLOURS = {"black": (20, 20, 20), "red": (200, 30, 30), "blue": (30, 60, 200), "green": (20, 140, 40),
           "purple": (120, 40, 160), "orange": (230, 120, 20), "brown": (120, 70, 30)}
DIGITS = "0123456789"
BAR_COLOURS = ("red", "green", "blue", "orange")
TILE_COLOURS = ("red", "green", "blue", "orange", "purple", "brown")
# Needle values: words that never occur in the filler, so finding one is finding the needle.
SECRETS = ("apple", "river", "stone", "cloud", "tiger", "violin", "zebra", "anchor", "falcon",
           "guitar", "lemon", "magnet", "rocket", "dragon", "pepper", "walnut")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}

# Accuracy by guessing uniformly among a task's answers (0: open answers).
CHANCE = {"ocr": 1 / len(DIGITS), "chart": 1 / len(BAR_COLOURS), "table": 1 / len(DIGITS),
          "multi_image": 1 / len(TILE_COLOURS), "video": 1 / len(DIRECTIONS), "text": 0.0,
          "code": 0.0, "needle": 1 / len(SECRETS), "needle_short": 1 / len(SECRETS)}


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = os.path.join(FONT_DIR, name)
    if os.path.exists(path):
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # no DejaVu: Pillow's bundled font


def chat(question: str, answer: str, images: list[str] | None = None, system: str = NO_THINK,
         reasoning: str | None = None) -> dict:
    user = "".join("<image>\n" for _ in images or []) + question
    assistant = {"role": "assistant", "content": answer}
    if reasoning:
        assistant["reasoning"] = reasoning
    record = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}, assistant]}
    if images:
        record["images"] = images
    return record


def _save(img: Image.Image, image_dir: str, name: str) -> str:
    img.save(os.path.join(image_dir, name), format="PNG", compress_level=1)
    return f"images/{name}"


def _light(rng: random.Random) -> tuple:
    return tuple(rng.randint(220, 255) for _ in range(3))


def _record(task: str, rid: str, rec: dict) -> dict:
    return {"id": rid, "task": task, "answer": rec["messages"][-1]["content"], **rec}


# ---- OCR ---------------------------------------------------------------------------------------
def make_ocr(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    """One large bold digit filling a 64 px tile, dark on light, with a little jitter."""
    records = []
    for i in range(n):
        digit = rng.choice(DIGITS)
        img = Image.new("RGB", (64, 64), _light(rng))
        d = ImageDraw.Draw(img)
        d.text((32 + rng.randint(-2, 2), 32 + rng.randint(-2, 2)), digit,
               font=font("DejaVuSans-Bold.ttf", 52), fill=(rng.randint(0, 40),) * 3, anchor="mm")
        path = _save(img, image_dir, f"{prefix}{i:06d}.png")
        records.append(_record("ocr", f"{prefix}{i:06d}", chat("What digit is in the image?", digit, [path])))
    return records


# ---- charts and tables -------------------------------------------------------------------------
def make_chart(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    """Four bars (one per 16 px column) in the four bar colours, shuffled; the tallest reaches
    the top quarter of the tile, the others stay below its middle."""
    records = []
    for i in range(n):
        colours = list(BAR_COLOURS)
        rng.shuffle(colours)
        tallest = rng.randrange(4)
        img = Image.new("RGB", (64, 64), "white")
        d = ImageDraw.Draw(img)
        for j, colour in enumerate(colours):
            height = rng.randint(50, 60) if j == tallest else rng.randint(8, 30)
            d.rectangle((j * 16 + 2, 63 - height, j * 16 + 13, 63), fill=COLOURS[colour])
        path = _save(img, image_dir, f"{prefix}{i:06d}.png")
        rec = chat("Which bar is the tallest? Answer with its color.", colours[tallest], [path])
        records.append(_record("chart", f"{prefix}{i:06d}", rec))
    return records


CELLS = ("left", "right")


def make_table(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    """A one-row table of two large digits: each 32 px column is two image tokens of the tiny
    model; read the left or the right cell."""
    records = []
    for i in range(n):
        digits = [rng.choice(DIGITS) for _ in CELLS]
        img = Image.new("RGB", (64, 64), "white")
        d = ImageDraw.Draw(img)
        d.rectangle((0, 4, 63, 59), outline=(120, 120, 120))
        d.line((32, 4, 32, 59), fill=(120, 120, 120))
        f = font("DejaVuSans-Bold.ttf", 40)
        for k, digit in enumerate(digits):
            d.text((k * 32 + 16, 32), digit, font=f, fill="black", anchor="mm")
        path = _save(img, image_dir, f"{prefix}{i:06d}.png")
        k = rng.randrange(len(CELLS))
        rec = chat(f"What number is in the {CELLS[k]} cell of the table?", digits[k], [path])
        records.append(_record("table", f"{prefix}{i:06d}", rec))
    return records


# ---- multi-image -------------------------------------------------------------------------------
def make_multi_image(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    """Two tiles, each a shape of its own colour; name the colour of the first or the second."""
    records = []
    for i in range(n):
        colours = rng.sample(TILE_COLOURS, 2)
        paths = []
        for j, colour in enumerate(colours):
            img = Image.new("RGB", (64, 64), _light(rng))
            d = ImageDraw.Draw(img)
            r = rng.randint(18, 26)
            box = (32 - r, 32 - r, 32 + r, 32 + r)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=COLOURS[colour])
            paths.append(_save(img, image_dir, f"{prefix}{i:06d}_{j}.png"))
        j = rng.randrange(2)
        rec = chat(f"What color is the {('first', 'second')[j]} image?", colours[j], paths)
        records.append(_record("multi_image", f"{prefix}{i:06d}", rec))
    return records


# ---- video -------------------------------------------------------------------------------------
VIDEO_SIZE = 64
VIDEO_FPS = (8, 10, 12, 15)  # source frame rates, mixed
VIDEO_DURATIONS = (4, 5, 6, 8)  # seconds: at 2 fps, 8-16 sampled frames (8 kept by max_frames)


def _background(rng: random.Random) -> Image.Image:
    """A static scene: a light wash with a few grey blocks (EVS prunes what never changes)."""
    img = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), tuple(rng.randint(215, 250) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y, g = rng.randrange(VIDEO_SIZE), rng.randrange(VIDEO_SIZE), rng.randint(150, 200)
        d.rectangle((x, y, x + rng.randint(4, 12), y + rng.randint(4, 12)), fill=(g, g, g))
    return img


def _frame_times(rng: random.Random, duration: float, fps: int, variable: bool) -> list[float]:
    if not variable:
        return [k / fps for k in range(int(duration * fps))]
    times, t = [], 0.0  # variable frame rate: intervals of 1, 2 or 4 frame periods
    while t < duration - 1e-9:
        times.append(round(t, 3))
        t += rng.choice((1, 2, 4)) / fps
    return times


def render_clip(rng: random.Random, duration: float, fps: int, variable: bool, colour: str,
                start: tuple, end: tuple, radius: int = 11) -> tuple[list, list]:
    """Frames of a ball moving linearly from ``start`` to ``end`` over the clip, and their times."""
    background = _background(rng)
    times = _frame_times(rng, duration, fps, variable)
    frames = []
    for t in times:
        f = t / duration
        img = background.copy()
        cx, cy = start[0] + (end[0] - start[0]) * f, start[1] + (end[1] - start[1]) * f
        ImageDraw.Draw(img).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOURS[colour])
        frames.append(np.asarray(img))
    return frames, times


def make_video(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    """Real encoded clips (H.264 .mp4 and VP9 .webm, alternating; mixed frame rates; the first
    clip has a variable frame rate) of a 64 px scene where a ball crosses from one side to the
    other; name the direction. Clips go to ``<task>/clips`` next to ``image_dir``."""
    from megatron_vlm.data.video_encode import encode_frames

    clip_dir = os.path.join(os.path.dirname(image_dir), "clips")
    os.makedirs(clip_dir, exist_ok=True)
    records = []
    for i in range(n):
        direction = rng.choice(list(DIRECTIONS))
        dx, dy = DIRECTIONS[direction]
        across = rng.randint(14, 50)  # the coordinate that stays
        x0, y0 = (10 if dx > 0 else 54 if dx < 0 else across), (10 if dy > 0 else 54 if dy < 0 else across)
        duration = rng.choice(VIDEO_DURATIONS)
        frames, times = render_clip(rng, duration, rng.choice(VIDEO_FPS), i == 0,
                                    rng.choice(("red", "blue", "green", "black")),
                                    (x0, y0), (x0 + 44 * dx, y0 + 44 * dy))
        codec = ("h264", "vp9")[i % 2]
        name = f"{prefix}{i:06d}.{'mp4' if codec == 'h264' else 'webm'}"
        with open(os.path.join(clip_dir, name), "wb") as f:
            f.write(encode_frames(frames, times, codec))
        question = "In which direction does the ball move? Answer left, right, up or down."
        rec = {"messages": [{"role": "system", "content": NO_THINK},
                            {"role": "user", "content": "<video>\n" + question},
                            {"role": "assistant", "content": direction}],
               "videos": [{"type": "video", "source": f"clips/{name}"}]}
        records.append({"id": f"{prefix}{i:06d}", "task": "video", "answer": direction, **rec})
    return records


# ---- text instructions -------------------------------------------------------------------------
def make_text(rng: random.Random, n: int, image_dir: str | None, prefix: str) -> list[dict]:
    """Copying by position, which carries over to unseen word lists: the first or the last word
    of a list of 2-5 words; a few with a reasoning trace under ``/think``."""
    records = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        which = rng.choice(("first", "last"))
        a = words[0] if which == "first" else words[-1]
        q = f"What is the {which} word in this list: {' '.join(words)}?"
        reasoning = f"The list has {len(words)} words; the {which} is {a}." if rng.random() < 0.1 else None
        rec = chat(q, a, system="/think" if reasoning else NO_THINK, reasoning=reasoning)
        records.append({"id": f"{prefix}{i:06d}", "task": "text", "answer": a, **rec})
    return records


# ---- code --------------------------------------------------------------------------------------
def stdlib_python_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib",
                                                              "__pycache__", "lib2to3", "turtledemo"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def code_chunks(max_chunks: int, lines_per_chunk: int = 40, max_chars: int = 1600) -> list[tuple[str, str]]:
    """(name, chunk) pieces of stdlib sources, spread over the files, in a fixed order."""
    files = stdlib_python_files()
    chunks = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
        for start in range(0, len(lines), lines_per_chunk):
            piece = "\n".join(lines[start : start + lines_per_chunk]).strip("\n")
            if len(piece) < 200:
                continue
            chunks.append((f"{rel}:{start + 1}", piece[:max_chars]))
    if len(chunks) > max_chunks:  # spread the selection over the whole library
        step = len(chunks) / max_chunks
        chunks = [chunks[int(k * step)] for k in range(max_chunks)]
    return chunks


def make_code(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    chunks = code_chunks(n_train + n_eval)
    rng.shuffle(chunks)
    train = [{"id": f"code{i:06d}", "task": "code", "source": name, "text": text}
             for i, (name, text) in enumerate(chunks[n_eval:])]
    evals = []
    for i, (name, text) in enumerate(chunks[:n_eval]):
        lines = text.split("\n")
        # the next line to predict: a non-empty line in the middle of the chunk
        # (short lines such as "else:" or "return result", which a small model can get right)
        candidates = [k for k in range(4, len(lines)) if 0 < len(lines[k].strip()) <= 16]
        candidates = candidates or [k for k in range(4, len(lines)) if lines[k].strip()]
        k = rng.choice(candidates) if candidates else len(lines) - 1
        evals.append({"id": f"codeeval{i:06d}", "task": "code", "source": name, "text": text,
                      "prefix": "\n".join(lines[:k]) + "\n", "answer": lines[k]})
    return train, evals


# ---- needle in a haystack ----------------------------------------------------------------------
NEEDLE_SHORT_WORDS = (100, 130)  # the control length (~150 tokens); the long one is a make_demo_data option


def _filler_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(NOUNS)} near the {rng.choice(PLACES)}.")


def make_needle(rng: random.Random, n: int, min_words: int, max_words: int, prefix: str,
                task: str = "needle") -> list[dict]:
    """Filler sentences with one "The secret word is W." at a random depth; W comes from
    ``SECRETS``, words the filler never uses."""
    records = []
    for i in range(n):
        target_words = rng.randint(min_words, max_words)
        sentences, words = [], 0
        while words < target_words:
            s = _filler_sentence(rng)
            sentences.append(s)
            words += len(s.split())
        secret = rng.choice(SECRETS)
        depth = rng.randrange(len(sentences) + 1)
        sentences.insert(depth, f"The secret word is {secret}.")
        q = f"{' '.join(sentences)}\n\nWhat is the secret word? Answer with one word."
        rec = chat(q, secret)
        records.append({"id": f"{prefix}{i:06d}", "task": task, "answer": secret,
                        "depth": depth / len(sentences), **rec})
    return records
