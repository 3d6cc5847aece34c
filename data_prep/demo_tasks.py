"""Generators of the demo corpus: small, learnable tasks with exact answers.

Every generator is ``make_<task>(rng, n, image_dir) -> list[record]``; records follow
data_prep/records.py plus ``task`` and ``answer`` (the exact string a correct model generates,
used by evaluation by generation). Images are small PNGs written to ``image_dir`` and referenced
relative to the task folder (``images/NAME.png``).

Tasks:
- ocr: a word or code rendered in a DejaVu font; read it back, or name its colour.
- chart: bar chart with value labels; highest bar, or a bar's value.
- table: a small grid table; look up a cell.
- multi_image: two images with a coloured shape and a digit; compare them.
- video: encoded clips (H.264 / VP9, 5-60 s, mixed and one variable frame rate) of shapes moving,
  appearing or disappearing on a static background; name the direction, count the shapes, say
  which appears first or which disappears.
- text: instructions with computable answers (arithmetic, reversing, sorting, counting),
  a few with a reasoning trace under ``/think``.
- code: chunks of the running interpreter's standard library, as plain ``text`` documents; eval
  asks for the next line of a held-out chunk.
- needle: a long filler document hiding one fact; ask for it.
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
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


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


# ---- OCR ---------------------------------------------------------------------------------------
OCR_SIZES = ((128, 64), (192, 64), (256, 64), (128, 96), (96, 96), (160, 64))
OCR_QUESTIONS = ("What text is written in the image?", "Read the text in the image.",
                 "What does the image say?", "Transcribe the text shown.")


def _ocr_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return rng.choice(WORDS)
    if kind < 0.8:
        return f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
    return "".join(rng.choice(LETTERS + "23456789") for _ in range(rng.randint(3, 5)))


def _fit_font(draw: ImageDraw.ImageDraw, text: str, face: str, box_w: int, box_h: int, start: int) -> ImageFont.FreeTypeFont:
    size = start
    while size > 8:
        f = font(face, size)
        l, t, r, b = draw.textbbox((0, 0), text, font=f)
        if r - l <= box_w and b - t <= box_h:
            return f
        size -= 2
    return font(face, 8)


def make_ocr(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    records = []
    for i in range(n):
        w, h = rng.choice(OCR_SIZES)
        text = _ocr_text(rng)
        colour = rng.choice(list(COLOURS))
        bg = tuple(rng.randint(225, 255) for _ in range(3))
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        f = _fit_font(draw, text, rng.choice(FONT_FILES), w - 8, h - 8, rng.randint(22, 32))
        l, t, r, b = draw.textbbox((0, 0), text, font=f)
        x = rng.randint(4, max(4, w - 4 - (r - l))) - l
        y = rng.randint(4, max(4, h - 4 - (b - t))) - t
        draw.text((x, y), text, font=f, fill=COLOURS[colour])
        path = _save(img, image_dir, f"{prefix}{i:06d}.png")
        if rng.random() < 0.8:
            rec = chat(rng.choice(OCR_QUESTIONS), text, [path])
        else:
            rec = chat("What color is the text in the image? Answer with one word.", colour, [path])
        records.append({"id": f"{prefix}{i:06d}", "task": "ocr", "answer": rec["messages"][-1]["content"], **rec})
    return records


# ---- charts and tables -------------------------------------------------------------------------
def make_chart(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    records = []
    for i in range(n):
        k = rng.randint(3, 5)
        labels = rng.sample(LETTERS, k)
        values = [rng.randint(1, 9) for _ in range(k)]
        while values.count(max(values)) > 1:  # a unique highest bar
            values[rng.randrange(k)] = rng.randint(1, 9)
        w, h = 160, 120
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        base, top, left = h - 18, 14, 8
        d.line((left, base, w - 4, base), fill=(60, 60, 60))
        slot = (w - left - 4) / k
        small = font("DejaVuSans-Bold.ttf", 12)
        colour = COLOURS[rng.choice(["blue", "green", "red", "purple", "orange"])]
        for j, (lab, v) in enumerate(zip(labels, values)):
            x0 = left + j * slot + slot * 0.2
            x1 = left + (j + 1) * slot - slot * 0.2
            y0 = base - (base - top) * v / 9
            d.rectangle((x0, y0, x1, base), fill=colour)
            d.text(((x0 + x1) / 2, y0 - 1), str(v), font=small, fill="black", anchor="md")
            d.text(((x0 + x1) / 2, base + 2), lab, font=small, fill="black", anchor="ma")
        path = _save(img, image_dir, f"{prefix}{i:06d}.png")
        if rng.random() < 0.5:
            q, a = "Which bar in the chart is the highest? Answer with its label.", labels[values.index(max(values))]
        else:
            j = rng.randrange(k)
            q, a = f"What is the value of bar {labels[j]} in the chart?", str(values[j])
        rec = chat(q, a, [path])
        records.append({"id": f"{prefix}{i:06d}", "task": "chart", "answer": a, **rec})
    return records


def make_table(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    records = []
    headers = ("price", "count", "size", "score", "weight", "age")
    for i in range(n):
        n_rows, n_cols = rng.randint(2, 4), rng.randint(2, 3)
        rows = rng.sample(NOUNS, n_rows)
        cols = rng.sample(headers, n_cols)
        cells = [[str(rng.randint(1, 99)) for _ in cols] for _ in rows]
        cw, rh = 48, 20
        w, h = cw * (n_cols + 1), rh * (n_rows + 1)
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        f = font("DejaVuSans.ttf", 11)
        fb = font("DejaVuSans-Bold.ttf", 11)
        for r in range(n_rows + 2):
            d.line((0, r * rh, w, r * rh), fill=(90, 90, 90))
        for c in range(n_cols + 2):
            d.line((c * cw, 0, c * cw, h), fill=(90, 90, 90))
        for c, name in enumerate(cols):
            d.text(((c + 1.5) * cw, rh / 2), name, font=fb, fill="black", anchor="mm")
        for r, name in enumerate(rows):
            d.text((0.5 * cw, (r + 1.5) * rh), name, font=fb, fill="black", anchor="mm")
            for c in range(n_cols):
                d.text(((c + 1.5) * cw, (r + 1.5) * rh), cells[r][c], font=f, fill="black", anchor="mm")
        img = img.crop((0, 0, w + 1, h + 1))
        path = _save(img, image_dir, f"{prefix}{i:06d}.png")
        r, c = rng.randrange(n_rows), rng.randrange(n_cols)
        a = cells[r][c]
        rec = chat(f"In the table, what is the {cols[c]} of the {rows[r]}?", a, [path])
        records.append({"id": f"{prefix}{i:06d}", "task": "table", "answer": a, **rec})
    return records


# ---- multi-image -------------------------------------------------------------------------------
def _shape_image(rng: random.Random, shape: str, colour: str, digit: int) -> Image.Image:
    img = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(img)
    rgb = COLOURS[colour]
    if shape == "circle":
        d.ellipse((6, 6, 58, 58), fill=rgb)
    elif shape == "square":
        d.rectangle((8, 8, 56, 56), fill=rgb)
    else:
        d.polygon(((32, 4), (60, 58), (4, 58)), fill=rgb)
    d.text((32, 36), str(digit), font=font("DejaVuSans-Bold.ttf", 22), fill="white", anchor="mm")
    return img


def make_multi_image(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    records = []
    colours = [c for c in COLOURS if c != "black"]
    for i in range(n):
        shapes = [rng.choice(SHAPES) for _ in range(2)]
        cols = [rng.choice(colours) for _ in range(2)]
        digits = rng.sample(range(1, 10), 2)
        paths = [_save(_shape_image(rng, s, c, dg), image_dir, f"{prefix}{i:06d}_{j}.png")
                 for j, (s, c, dg) in enumerate(zip(shapes, cols, digits))]
        kind = rng.randrange(4)
        if kind == 0:
            q = "Which image shows the larger number? Answer first or second."
            a = "first" if digits[0] > digits[1] else "second"
        elif kind == 1:
            q = "Do the two images show the same shape? Answer yes or no."
            a = "yes" if shapes[0] == shapes[1] else "no"
        elif kind == 2:
            j = rng.randrange(2)
            q = f"What color is the shape in the {('first', 'second')[j]} image?"
            a = cols[j]
        else:
            q = "What is the sum of the numbers in the two images?"
            a = str(sum(digits))
        rec = chat(q, a, paths)
        records.append({"id": f"{prefix}{i:06d}", "task": "multi_image", "answer": a, **rec})
    return records


# ---- video -------------------------------------------------------------------------------------
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
VIDEO_SIZE = 64
VIDEO_FPS = (8, 10, 12, 15)  # source frame rates, mixed
VIDEO_DURATIONS = (5, 6, 8, 10, 12, 15, 20, 30, 45, 60)  # seconds; long ones are rarer
_DURATION_WEIGHTS = (4, 4, 4, 4, 3, 3, 2, 1, 1, 1)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: int = 8) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon(((cx, cy - r - 1), (cx + r + 1, cy + r), (cx - r - 1, cy + r)), fill=COLOURS[colour])


def _background(rng: random.Random) -> Image.Image:
    """A static scene: a light wash with a few grey blocks (EVS prunes what never changes)."""
    img = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), tuple(rng.randint(215, 250) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y, g = rng.randrange(VIDEO_SIZE), rng.randrange(VIDEO_SIZE), rng.randint(150, 200)
        d.rectangle((x, y, x + rng.randint(4, 12), y + rng.randint(4, 12)), fill=(g, g, g))
    return img


def _video_story(rng: random.Random, colours: list) -> tuple[str, str, list]:
    """(question, answer, objects); each object: shape, colour, appear/disappear fractions of the
    clip, start and end positions. Events fall at coarse fractions so that 16 uniformly spread
    frames see them."""
    kind = rng.randrange(4)
    picks = rng.sample([(s, c) for s in SHAPES for c in colours], 4)
    if kind == 0:  # motion
        direction = rng.choice(list(DIRECTIONS))
        dx, dy = DIRECTIONS[direction]
        shape, colour = picks[0]
        x0 = 12 if dx > 0 else (52 if dx < 0 else rng.randint(14, 50))
        y0 = 12 if dy > 0 else (52 if dy < 0 else rng.randint(14, 50))
        obj = (shape, colour, 0.0, 1.0, (x0, y0), (x0 + 40 * dx, y0 + 40 * dy))
        return f"In which direction does the {shape} move? Answer left, right, up or down.", direction, [obj]
    if kind == 1:  # count appearing shapes
        count = rng.randint(1, 4)
        spots = [(16, 16), (48, 16), (16, 48), (48, 48)]
        rng.shuffle(spots)
        objs = [(s, c, rng.choice((0.0, 0.25, 0.5)), 1.0, spots[k], spots[k]) for k, (s, c) in enumerate(picks[:count])]
        return "How many shapes appear in the video?", str(count), objs
    (s1, c1), (s2, c2) = picks[:2]
    if kind == 2:  # order of appearance
        t1, t2 = rng.choice((0.1, 0.2)), rng.choice((0.5, 0.6))
        objs = [(s1, c1, t1, 1.0, (18, 32), (18, 32)), (s2, c2, t2, 1.0, (46, 32), (46, 32))]
        rng.shuffle(objs)
        return (f"Which appears first, the {objs[0][1]} {objs[0][0]} or the {objs[1][1]} {objs[1][0]}?",
                f"{c1} {s1}", objs)
    gone = rng.choice((0.35, 0.5, 0.65))  # one of two shapes disappears
    objs = [(s1, c1, 0.0, gone, (18, 32), (18, 32)), (s2, c2, 0.0, 1.0, (46, 32), (46, 32))]
    rng.shuffle(objs)
    return (f"Which shape disappears, the {objs[0][1]} {objs[0][0]} or the {objs[1][1]} {objs[1][0]}?",
            f"{c1} {s1}", objs)


def _frame_times(rng: random.Random, duration: float, fps: int, variable: bool) -> list[float]:
    if not variable:
        return [k / fps for k in range(int(duration * fps))]
    times, t = [], 0.0  # variable frame rate: intervals of 1, 2 or 4 frame periods
    while t < duration - 1e-9:
        times.append(round(t, 3))
        t += rng.choice((1, 2, 4)) / fps
    return times


def render_clip(rng: random.Random, duration: float, fps: int, variable: bool, objs: list) -> tuple[list, list]:
    background = _background(rng)
    times = _frame_times(rng, duration, fps, variable)
    frames = []
    for t in times:
        f = t / duration
        img = background.copy()
        d = ImageDraw.Draw(img)
        for shape, colour, appear, disappear, (x0, y0), (x1, y1) in objs:
            if appear <= f < disappear:
                _draw_shape(d, shape, colour, x0 + (x1 - x0) * f, y0 + (y1 - y0) * f)
        frames.append(np.asarray(img))
    return frames, times


def make_video(rng: random.Random, n: int, image_dir: str, prefix: str) -> list[dict]:
    """Real encoded clips (H.264 .mp4 and VP9 .webm, alternating; mixed frame rates; the first
    clip has a variable frame rate) of 64 px shapes appearing, disappearing or moving on a static
    background, 5-60 s long; questions about motion, count and order. Clips go to
    ``<task>/clips`` next to ``image_dir``."""
    from megatron_vlm.data.video_encode import encode_frames

    clip_dir = os.path.join(os.path.dirname(image_dir), "clips")
    os.makedirs(clip_dir, exist_ok=True)
    colours = [c for c in COLOURS if c != "black"]
    records = []
    for i in range(n):
        question, answer, objs = _video_story(rng, colours)
        duration = rng.choices(VIDEO_DURATIONS, _DURATION_WEIGHTS)[0]
        fps = rng.choice(VIDEO_FPS) if duration <= 20 else 8  # long clips: fewer frames to encode
        frames, times = render_clip(rng, duration, fps, i == 0, objs)
        codec = ("h264", "vp9")[i % 2]
        name = f"{prefix}{i:06d}.{'mp4' if codec == 'h264' else 'webm'}"
        with open(os.path.join(clip_dir, name), "wb") as f:
            f.write(encode_frames(frames, times, codec))
        rec = {"messages": [{"role": "system", "content": NO_THINK},
                            {"role": "user", "content": "<video>\n" + question},
                            {"role": "assistant", "content": answer}],
               "videos": [{"type": "video", "source": f"clips/{name}"}]}
        records.append({"id": f"{prefix}{i:06d}", "task": "video", "answer": answer, **rec})
    return records


# ---- text instructions -------------------------------------------------------------------------
def make_text(rng: random.Random, n: int, image_dir: str | None, prefix: str) -> list[dict]:
    records = []
    for i in range(n):
        kind = rng.randrange(6)
        reasoning = None
        if kind == 0:
            a_, b_ = rng.randint(10, 99), rng.randint(10, 99)
            q, a = f"What is {a_} + {b_}?", str(a_ + b_)
            if rng.random() < 0.3:
                reasoning = f"{a_} + {b_}: tens {a_ // 10 * 10} + {b_ // 10 * 10} = {a_ // 10 * 10 + b_ // 10 * 10}, " \
                            f"units {a_ % 10} + {b_ % 10} = {a_ % 10 + b_ % 10}, total {a_ + b_}."
        elif kind == 1:
            a_, b_ = rng.randint(2, 12), rng.randint(2, 12)
            q, a = f"What is {a_} times {b_}?", str(a_ * b_)
        elif kind == 2:
            w = rng.choice(WORDS)
            q, a = f"Reverse the letters of the word '{w}'.", w[::-1]
        elif kind == 3:
            nums = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
            q = "Sort these numbers from smallest to largest: " + " ".join(map(str, nums))
            a = " ".join(map(str, sorted(nums)))
        elif kind == 4:
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
            q, a = f"How many words are in this sentence: \"{' '.join(words)}\"?", str(len(words))
        else:
            w = rng.choice(WORDS)
            q, a = f"What is the first letter of the word '{w}'?", w[0]
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
        candidates = [k for k in range(4, len(lines)) if lines[k].strip()]
        k = rng.choice(candidates) if candidates else len(lines) - 1
        evals.append({"id": f"codeeval{i:06d}", "task": "code", "source": name, "text": text,
                      "prefix": "\n".join(lines[:k]) + "\n", "answer": lines[k]})
    return train, evals


# ---- needle in a haystack ----------------------------------------------------------------------
def _filler_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(NOUNS)} near the {rng.choice(PLACES)}.")


def make_needle(rng: random.Random, n: int, min_words: int, max_words: int, prefix: str) -> list[dict]:
    records = []
    for i in range(n):
        target_words = rng.randint(min_words, max_words)
        sentences, words = [], 0
        while words < target_words:
            s = _filler_sentence(rng)
            sentences.append(s)
            words += len(s.split())
        thing = f"{rng.choice(list(COLOURS))} {rng.choice(WORDS)}"
        code = str(rng.randint(1000, 9999))
        depth = rng.randrange(len(sentences) + 1)
        sentences.insert(depth, f"The secret number of the {thing} is {code}.")
        doc = " ".join(sentences)
        q = f"{doc}\n\nWhat is the secret number of the {thing}? Answer with the number only."
        rec = chat(q, code)
        records.append({"id": f"{prefix}{i:06d}", "task": "needle", "answer": code, "depth": depth / len(sentences),
                        **rec})
    return records
