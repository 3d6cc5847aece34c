"""Evaluation by greedy generation on held-out data: any eval shards with reference answers,
and the held-out tasks of the demo corpus as one configuration of it.

    samples = load_task_samples("ocr", data_root, encoder, tile_size=64, limit=20)
    scores, details = evaluate_tasks(model, tokenizer, ["ocr", "code", "mine=my_data/shards/eval"],
                                     data_root, tile_size=64, tokens_per_tile=4, limit=20)
    scores  # {"ocr_acc": 0.45, "code_line_acc": 0.1, "code_ppl": 12.3, "mine_acc": 0.2, "mine_anls": 0.5}

A task is a demo task name (below) or ``[NAME=]DIR``: eval shards of one's own (built by
``build_shards``), scored under ``NAME`` (default: the folder name, leaving out ``shards``,
``train`` and ``eval``; ``my_data/shards/eval`` -> ``my_data``). Every chat sample of the shards is
a question: the prompt is the conversation up to its last assistant turn, the reference is the
record's ``answer`` (a string, or a list of accepted strings) kept in the shard, else that last
assistant turn. Keys: ``NAME_acc`` (exact match after ``normalize``) and ``NAME_anls`` (ANLS:
mean over samples of the best 1 - normalised Levenshtein distance to a reference, 0 where that
distance is 0.5 or more; Biten et al., 2019), plus ``NAME_video_tokens`` when it has videos.

Demo tasks: where the samples come from (``data_root`` is the demo directory, the parent of
``shards/``):

- chat tasks (ocr, chart, table, multi_image, video, text, needle): the eval *shards*
  ``shards/<task>/eval`` read with the data package's shard reader and sample decoder, so the
  tiles are byte-for-byte the training tiles, normalised by the same function; the prompt is
  ``PromptEncoder.generation_prompt`` (conversation up to the user turn + assistant header + think
  opener). The reference answer is the record's ``answer`` in ``raw/<task>/eval.jsonl`` (joined
  by sample id), else the shard's ``answer``, else the last assistant turn. Without shards, the
  raw records are tiled by the caller's ``record_builder`` (``megatron_vlm/cli/evaluate.py`` passes the
  shard builder's own code, ``megatron_vlm.data_prep.records.tile_record``; the library does not import
  ``megatron_vlm.data_prep``) with the tiling of ``datasets.json``.
- code: ``raw/code/eval.jsonl`` (the shards hold the whole chunk but not the split point). The
  prompt is the record's ``prefix`` as a plain document (no chat template, as the code was
  trained); its trailing whitespace is left for the model to generate, so the prompt ends at a
  token boundary that training saw too. The predicted line is the text after that whitespace up
  to the next newline. ``code_ppl`` is the perplexity of the whole held-out chunks, tokenized as
  training tokenizes a text document (all tokens + eos are targets).

Scores (samples are the first ``limit`` of each eval set, in file order):

=============  ===================  =====================================================
task           key(s)               correct when
=============  ===================  =====================================================
ocr, chart,    ``<task>_acc``       prediction == answer after collapsing whitespace and
table,                              lower-casing (``normalize``)
multi_image,
video, text
needle         ``needle_acc``       the normalised answer occurs in the normalised prediction
code           ``code_line_acc``    predicted line == reference line, trailing whitespace
                                    ignored (indentation counts)
code           ``code_ppl``         exp(mean NLL per token) over the chunks (lower is better)
video          ``video_tokens``     mean ``<image>`` tokens per video the LLM reads (q = 0)
video          ``video_evs_acc``,   the same at the recipe's ``video.evs_rate`` q (EVS in the
               ``video_evs_tokens`` model after the connector), when q > 0
=============  ===================  =====================================================

Videos are sampled with the recipe's ``video`` section (``video`` argument); evaluation never
draws a random rate.

Generation budget: a sample may generate the tokens of its reference target (think block,
answer, end of turn; or the rest of the code line) plus ``slack`` tokens, capped at
``max_new_tokens``; samples whose reference needs more than ``max_new_tokens`` (reasoning traces,
long code lines) get the reference length + slack. A longer output could not be an exact match,
so the cap changes no exact-match score and keeps untrained stages (which rarely stop) fast
(ANLS of an output cut there is that of its first reference + slack tokens).
Chat generation stops at the end-of-turn token (eos) or at a turn marker; code generation at
eos or once the line is complete.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megatron_vlm.data.prompt import PromptEncoder
from megatron_vlm.data.tokenizer import SYSTEM_MARKER, THINK_END, TURN_MARKER

CHAT_TASKS = ("ocr", "chart", "table", "multi_image", "video", "text", "needle", "needle_short")
CODE_TASK = "code"
KNOWN_TASKS = CHAT_TASKS + (CODE_TASK,)

# task -> score keys it produces (in this order)
SCORE_KEYS = {**{t: (f"{t}_acc",) for t in CHAT_TASKS}, CODE_TASK: ("code_line_acc", "code_ppl")}


class EvalDataError(ValueError):
    """The eval data of a task is missing or does not match the model's inputs."""


# ---- scoring ------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Whitespace runs -> one space, trimmed, lower-cased."""
    return " ".join(text.split()).lower()


def exact_match(prediction: Optional[str], answer: str) -> bool:
    return prediction is not None and normalize(prediction) == normalize(answer)


def contains_answer(prediction: Optional[str], answer: str) -> bool:
    return prediction is not None and bool(normalize(answer)) and normalize(answer) in normalize(prediction)


def code_line_match(prediction: Optional[str], answer: str) -> bool:
    """Next-line exact match: indentation counts, trailing whitespace does not."""
    return prediction is not None and prediction.rstrip() == answer.rstrip()


def chat_answer_text(generated: str) -> str:
    """The answer part of a generated assistant turn: after the last ``</think>``, trimmed."""
    if THINK_END in generated:
        generated = generated.rsplit(THINK_END, 1)[1]
    return generated.strip()


def code_line_from_continuation(continuation: str, tail: str) -> Optional[str]:
    """The predicted next line: the continuation must first give back the prompt's stripped
    trailing whitespace ``tail`` (e.g. the newline); then everything up to the next newline.
    None when it does not start with ``tail`` (the model continued the previous line)."""
    if not continuation.startswith(tail):
        return None
    return continuation[len(tail):].split("\n", 1)[0]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


ANLS_THRESHOLD = 0.5


def anls(prediction: Optional[str], answer: str) -> float:
    """1 - normalised Levenshtein distance of the normalised strings; 0 at or above the threshold."""
    if prediction is None:
        return 0.0
    a, b = normalize(prediction), normalize(answer)
    if not a and not b:
        return 1.0
    distance = levenshtein(a, b) / max(len(a), len(b))
    return 1.0 - distance if distance < ANLS_THRESHOLD else 0.0


def references(answer) -> list:
    """A reference answer as a list of accepted strings."""
    return list(answer) if isinstance(answer, (list, tuple)) else [answer]


SCORERS: dict = {"exact": exact_match, "contains": contains_answer, "code_line": code_line_match,
                 "anls": anls}
TASK_SCORER = {**{t: "exact" for t in CHAT_TASKS}, "needle": "contains", "needle_short": "contains",
               CODE_TASK: "code_line"}


def mean_score(values: list) -> float:
    """Mean of per-sample scores (True/False count as 1/0)."""
    return float(sum(float(v) for v in values)) / len(values) if values else 0.0


def score_sample(scorer: str, prediction: Optional[str], answer) -> float:
    """The best score of ``prediction`` against any of the references."""
    return max(float(SCORERS[scorer](prediction, ref)) for ref in references(answer))


# ---- samples ------------------------------------------------------------------------------------
@dataclass
class EvalSample:
    task: str
    id: str
    prompt_ids: list
    answer: object                      # str, or a list of accepted strings
    ref_tokens: int                     # tokens a correct generation needs (incl. the stop token)
    tiles: Optional[np.ndarray] = None  # uint8 [N, T, T, 3] in <image> token order, or None
    tail: str = ""                      # code: the prompt's stripped trailing whitespace
    prompt_text: str = ""               # code: the prompt as text
    document: Optional[list] = None     # code: the whole chunk as training tokenizes it (+ eos)
    media: Optional[dict] = None        # {"tiles_per_media", "media_tokens"} (EVS), model kwargs
    video_tokens: list = field(default_factory=list)  # <image> tokens of each video in the prompt


def find_data_root(recipe) -> Path:
    """The demo data directory of a recipe: the folder holding ``shards/`` of its data paths,
    else the tokenizer's parent folder."""
    for source in list(recipe.data.eval) + list(recipe.data.blend):
        parts = Path(source.path.split("::")[0]).parts
        if "shards" in parts:
            return Path(*parts[: parts.index("shards")]) if parts.index("shards") else Path(".")
    return Path(recipe.data.tokenizer).parent


def _read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _raw_answers(data_root: Path, task: str) -> dict:
    path = data_root / "raw" / task / "eval.jsonl"
    if not path.is_file():
        return {}
    return {str(r.get("id")): r["answer"] for r in _read_jsonl(path) if "answer" in r}


def _last_assistant(conversation: list) -> Optional[str]:
    for turn in reversed(conversation):
        if turn["role"] == "assistant":
            return turn["content"]
    return None


def _chat_sample(task: str, sample_id: str, meta: dict, tiles: np.ndarray, answer: Optional[str],
                 encoder: PromptEncoder) -> EvalSample:
    conversation, media = meta["conversation"], meta.get("media", [])
    prompt_turns = conversation[:-1] if conversation and conversation[-1]["role"] == "assistant" else conversation
    encoded_prompt = encoder.encode_chat(prompt_turns, media, add_generation_prompt=True)
    prompt = encoded_prompt.tokens.tolist()  # = encoder.generation_prompt(conversation, media)
    pruned = any(k < n * encoder.tokens_per_tile
                 for n, k in zip(encoded_prompt.tiles_per_media, encoded_prompt.media_tokens))
    media_info = {"tiles_per_media": list(encoded_prompt.tiles_per_media),
                  "media_tokens": list(encoded_prompt.media_tokens)} if pruned else None
    video_tokens = [k for item, k in zip(media, encoded_prompt.media_tokens) if item["type"] == "video"]
    if answer is None:
        answer = _last_assistant(conversation)
    if answer is None or not references(answer):
        raise EvalDataError(f"{task} sample {sample_id}: no reference answer")
    # What a correct generation produces: the training target of the reference turn.
    turns = list(conversation)
    if not turns or turns[-1]["role"] != "assistant":
        turns.append({"role": "assistant", "content": references(answer)[0]})
    full = encoder.encode_chat(turns, media).tokens.tolist()
    ref = len(full) - len(prompt) - 1  # the full sample also ends with a newline after eos
    if ref < 1 or full[: len(prompt)] != prompt:
        ref = max(len(encoder.encode_plain(r)) for r in references(answer)) + 2
    return EvalSample(task, sample_id, prompt, answer, ref, tiles if len(tiles) else None,
                      media=media_info, video_tokens=video_tokens)


def _chat_from_shards(task: str, shard_dir, encoder: PromptEncoder, tile_size: int,
                      limit: Optional[int], answers: dict, video=None) -> list:
    from megatron_vlm.data.loader import resolve_shards, tile_size_problem
    from megatron_vlm.data.sample_decoder import SampleError, decode_sample
    from megatron_vlm.data.shard_reader import read_shard

    urls, manifest = resolve_shards(str(shard_dir))
    problem = tile_size_problem(manifest, tile_size, str(shard_dir))
    if problem:
        raise EvalDataError(problem)
    samples = []
    for url in urls:
        for raw in read_shard(url):
            if limit is not None and len(samples) >= limit:
                return samples
            if raw.error is not None:
                continue  # damaged data: the training loader skips it too
            try:
                decoded = decode_sample(raw, tile_size, video)
            except SampleError as exc:
                if exc.kind == "schema_error" and "px" in exc.reason:
                    raise EvalDataError(f"{shard_dir}: {exc}") from None
                continue
            if decoded.meta["kind"] != "chat":
                continue
            sample_id = str(decoded.meta.get("id", raw.key))
            _set_video_rate(decoded.meta, video)
            samples.append(_chat_sample(task, sample_id, decoded.meta, decoded.tiles,
                                        answers.get(sample_id, decoded.meta.get("answer")), encoder))
    return samples


def _set_video_rate(meta: dict, video) -> None:
    if video is not None and video.evs_rate > 0:
        for item in meta.get("media", []):
            if item["type"] == "video":
                item["evs_rate"] = video.evs_rate


def _chat_from_raw(task: str, data_root: Path, encoder: PromptEncoder, tile_size: int,
                   limit: Optional[int], video=None, record_builder=None) -> list:
    """No shards: tile the raw records with ``record_builder`` (the shard builder's code: a
    callable ``(record, line, base_dir, tiling, source_name) -> (metadata, [(member, bytes)])``
    raising ValueError for a record it cannot use) and the demo's tiling."""
    from megatron_vlm.data.image import decode_tile
    from megatron_vlm.data.schema import media_tile_names
    from megatron_vlm.data.tiling import TilingConfig

    path = data_root / "raw" / task / "eval.jsonl"
    info_path = data_root / "datasets.json"
    if record_builder is None:
        raise EvalDataError(f"task {task!r}: no eval shards under {data_root / 'shards' / task / 'eval'}; "
                            f"build them from {path} with megatron_vlm.data_prep.build_shards")
    tiling = None
    if info_path.is_file():
        tiling = TilingConfig.from_dict(json.loads(info_path.read_text())["tiling"])
    samples = []
    for line, record in enumerate(_read_jsonl(path), start=1):
        if limit is not None and len(samples) >= limit:
            break
        if tiling is None and (record.get("images") or record.get("videos")):
            raise EvalDataError(f"{path}: image records need {info_path} (its tiling) or shards")
        try:
            meta, members = record_builder(record, line, str(path.parent), tiling or TilingConfig(tile_size),
                                           path.name)
        except ValueError:  # the builder's errors for unusable records
            continue
        if meta["kind"] != "chat":
            continue
        if meta.get("media") and meta["tile_size"] != tile_size:
            raise EvalDataError(f"{info_path}: tiles of {meta['tile_size']} px, the recipe's "
                                f"data.tile_size is {tile_size}")
        data = dict(members)
        if any("member" in item for item in meta.get("media", [])):  # encoded clips: the loader's decoder
            from megatron_vlm.data.sample_decoder import SampleError, decode_sample
            from megatron_vlm.data.schema import dumps_metadata
            from megatron_vlm.data.shard_reader import RawSample

            try:
                decoded = decode_sample(RawSample(path.name, str(meta["id"]), {**data, "json": dumps_metadata(meta)}),
                                        tile_size, video)
            except SampleError:
                continue
            meta, array = decoded.meta, decoded.tiles
            _set_video_rate(meta, video)
            samples.append(_chat_sample(task, str(meta["id"]), meta, array, record.get("answer"), encoder))
            continue
        tiles = [decode_tile(data[name], tile_size) for item in meta.get("media", [])
                 for name in media_tile_names(item)]
        array = np.stack(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), np.uint8)
        samples.append(_chat_sample(task, str(meta["id"]), meta, array, record.get("answer"), encoder))
    return samples


def _code_samples(data_root: Path, encoder: PromptEncoder, limit: Optional[int]) -> list:
    path = data_root / "raw" / CODE_TASK / "eval.jsonl"
    if not path.is_file():
        raise EvalDataError(f"code evaluation needs {path} (records with 'prefix' and 'answer')")
    samples = []
    for record in _read_jsonl(path):
        if limit is not None and len(samples) >= limit:
            break
        if "prefix" not in record or "answer" not in record:
            continue
        prefix, answer = record["prefix"], record["answer"]
        prompt_text = prefix.rstrip()
        tail = prefix[len(prompt_text):]
        prompt = encoder.encode_plain(prompt_text)
        target = encoder.encode_plain(prompt_text + tail + answer + "\n")
        ref = max(1, len(target) - len(prompt))
        document = encoder.encode_text(record["text"]).tokens.tolist() if record.get("text") else None
        samples.append(EvalSample(CODE_TASK, str(record.get("id")), prompt, answer, ref, tail=tail,
                                  prompt_text=prompt_text, document=document))
    return samples


def load_task_samples(task: str, data_root, encoder: PromptEncoder, tile_size: int,
                      limit: Optional[int] = 20, video=None, record_builder=None) -> list:
    """The first ``limit`` eval samples of demo task ``task`` (see the module docstring for the
    sources; ``record_builder``: see ``_chat_from_raw``)."""
    if task not in KNOWN_TASKS:
        raise EvalDataError(f"unknown eval task {task!r}; known: {', '.join(KNOWN_TASKS)}; or eval "
                            "shards of your own as [NAME=]DIR")
    data_root = Path(data_root)
    if task == CODE_TASK:
        samples = _code_samples(data_root, encoder, limit)
    else:
        shard_dir = data_root / "shards" / task / "eval"
        if shard_dir.is_dir():
            samples = _chat_from_shards(task, shard_dir, encoder, tile_size, limit,
                                        _raw_answers(data_root, task), video)
        elif (data_root / "raw" / task / "eval.jsonl").is_file():
            samples = _chat_from_raw(task, data_root, encoder, tile_size, limit, video, record_builder)
        else:
            raise EvalDataError(f"no eval data for task {task!r}: neither {shard_dir} nor "
                                f"{data_root / 'raw' / task / 'eval.jsonl'} exists")
    if not samples:
        raise EvalDataError(f"task {task!r}: no usable eval sample under {data_root}")
    return samples


@dataclass(frozen=True)
class ShardEvalSet:
    """Eval shards of one's own: every chat sample is a question with a reference answer."""
    name: str   # score key prefix
    path: str   # shard directory (with index.json), manifest or shard spec, as data.eval paths


def is_shard_spec(task: str) -> bool:
    """A task given as ``[NAME=]DIR`` rather than a demo task name."""
    return "=" in task or "/" in task or "\\" in task or Path(task).is_dir()


def shard_eval_set(spec: str) -> ShardEvalSet:
    """``NAME=DIR`` or ``DIR`` (named after its folder, without shards/train/eval parts)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        parts = [p for p in Path(path.split("::")[0]).parts if p not in ("train", "eval", "shards", "/")]
        name = parts[-1] if parts else "shards"
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name.strip())
    if not name or not path.strip():
        raise EvalDataError(f"eval task {spec!r}: expected NAME=DIR or DIR")
    return ShardEvalSet(name, path.strip())


def load_shard_samples(eval_set: ShardEvalSet, encoder: PromptEncoder, tile_size: int,
                       limit: Optional[int] = 20, video=None) -> list:
    """The first ``limit`` chat samples of ``eval_set`` (references: the shards' ``answer``, else
    the last assistant turn)."""
    if "://" not in eval_set.path and not any(c in eval_set.path for c in "{*:") \
            and not Path(eval_set.path).exists():
        raise EvalDataError(f"eval shards {eval_set.name!r}: {eval_set.path} does not exist")
    try:
        samples = _chat_from_shards(eval_set.name, eval_set.path, encoder, tile_size, limit, {}, video)
    except (FileNotFoundError, ValueError) as exc:  # no tars, a foreign manifest
        if isinstance(exc, EvalDataError):
            raise
        raise EvalDataError(f"eval shards {eval_set.name!r}: {exc}") from None
    if not samples:
        raise EvalDataError(f"eval shards {eval_set.name!r}: no chat sample in {eval_set.path}")
    return samples


def shard_scorers(name: str) -> dict:
    """Score key -> scorer of an eval set of one's own."""
    return {f"{name}_acc": "exact", f"{name}_anls": "anls"}


# ---- running ------------------------------------------------------------------------------------
def generation_budget(sample: EvalSample, max_new_tokens: int, slack: int) -> int:
    """Reference length + slack, capped at max_new_tokens unless the reference needs more."""
    need = max(1, sample.ref_tokens + slack)
    return need if sample.ref_tokens > max_new_tokens else min(need, max_new_tokens)


@dataclass
class TaskResult:
    task: str
    scores: dict
    seconds: float
    num_samples: int
    predictions: list = field(default_factory=list)


def run_task(model, tokenizer, samples: list, max_new_tokens: int = 32, slack: int = 4,
             vocab_limit: Optional[int] = None, scorers: Optional[dict] = None) -> TaskResult:
    """Generate for every sample of one task and score them. ``scorers``: score key -> scorer
    name (``SCORERS``); default: the demo task's key and scorer. The first key also gives each
    prediction's ``correct``."""
    from megatron_vlm.evaluation.generate import greedy_generate, sequence_nll

    start = time.perf_counter()
    task = samples[0].task
    vocab_limit = vocab_limit if vocab_limit is not None else tokenizer.vocab_size
    scorers = scorers or {SCORE_KEYS[task][0]: TASK_SCORER[task]}
    stop_ids = {tokenizer.eos_id}
    if task != CODE_TASK:  # a new turn also ends the answer
        for marker in (SYSTEM_MARKER, TURN_MARKER):
            try:
                stop_ids.add(tokenizer.token_id(marker))
            except KeyError:
                pass
    values: dict = {key: [] for key in scorers}
    predictions = []
    nll_sum, nll_count = 0.0, 0
    for sample in samples:
        stop_fn = None
        if task == CODE_TASK:
            prompt_text = tokenizer.decode(sample.prompt_ids)

            def stop_fn(tokens, sample=sample, prompt_text=prompt_text):
                cont = tokenizer.decode(sample.prompt_ids + tokens)[len(prompt_text):]
                if not (cont.startswith(sample.tail) or sample.tail.startswith(cont)):
                    return True  # it cannot give the line any more
                return "\n" in cont[len(sample.tail):]

        gen = greedy_generate(model, sample.prompt_ids, tiles=sample.tiles,
                              max_new_tokens=generation_budget(sample, max_new_tokens, slack),
                              stop_ids=stop_ids, vocab_limit=vocab_limit, stop_fn=stop_fn,
                              media=sample.media)
        if task == CODE_TASK:
            prompt_text = tokenizer.decode(sample.prompt_ids)
            cont = tokenizer.decode(sample.prompt_ids + gen.tokens)[len(prompt_text):]
            prediction = code_line_from_continuation(cont, sample.tail)
            if sample.document is not None:
                nll, count = sequence_nll(model, sample.document, vocab_limit=vocab_limit)
                nll_sum, nll_count = nll_sum + nll, nll_count + count
        else:
            prediction = chat_answer_text(tokenizer.decode(gen.tokens))
        sample_scores = {key: score_sample(name, prediction, sample.answer) for key, name in scorers.items()}
        for key, value in sample_scores.items():
            values[key].append(value)
        first = next(iter(scorers))
        entry = {"id": sample.id, "answer": sample.answer, "prediction": prediction,
                 "correct": sample_scores[first] >= 1.0, "stop": gen.stop_reason,
                 "new_tokens": len(gen.tokens)}
        if len(scorers) > 1:
            entry["scores"] = sample_scores
        predictions.append(entry)
    scores = {key: mean_score(v) for key, v in values.items()}
    if task == CODE_TASK and nll_count:
        scores["code_ppl"] = math.exp(min(nll_sum / nll_count, 700.0))
    video_tokens = [k for s in samples for k in s.video_tokens]
    if video_tokens:
        scores["video_tokens" if task == "video" else f"{task}_video_tokens"] = float(np.mean(video_tokens))
    return TaskResult(task, scores, time.perf_counter() - start, len(samples), predictions)


def evaluate_tasks(model, tokenizer, tasks: list, data_root, tile_size: int, tokens_per_tile: int,
                   limit: Optional[int] = 20, max_new_tokens: int = 32, slack: int = 4,
                   log: Optional[Callable[[str], None]] = None, video=None,
                   record_builder=None) -> tuple:
    """Scores of every task (one flat dict) and the per-task results (timings, predictions).

    ``tasks``: demo task names and ``[NAME=]DIR`` eval shards of one's own (module docstring).
    ``video`` (``VideoOptions``, the recipe's ``video`` section): sampling of videos, which run at
    q = 0 and, for the demo video task when ``video.evs_rate`` > 0, again at that rate
    (``video_evs_*`` keys). ``record_builder``: tiles raw demo records where a demo task has no
    shards (see ``_chat_from_raw``)."""
    import dataclasses

    from megatron_vlm.data.video import VideoOptions

    encoder = PromptEncoder(tokenizer, tokens_per_tile)
    video = video or VideoOptions()
    q0 = dataclasses.replace(video, evs_rate=0.0, evs_rate_sampling="fixed")
    scores, results = {}, []
    runs = [(t, q0) for t in tasks]
    if "video" in tasks and video.evs_rate > 0:
        runs.insert(tasks.index("video") + 1, ("video_evs", dataclasses.replace(video, evs_rate_sampling="fixed")))
    for task, task_video in runs:
        if task not in KNOWN_TASKS and task != "video_evs" and is_shard_spec(task):
            eval_set = shard_eval_set(task)
            samples = load_shard_samples(eval_set, encoder, tile_size, limit, task_video)
            result = run_task(model, tokenizer, samples, max_new_tokens=max_new_tokens, slack=slack,
                              scorers=shard_scorers(eval_set.name))
        else:
            samples = load_task_samples(task.replace("_evs", ""), data_root, encoder, tile_size, limit,
                                        task_video, record_builder)
            result = run_task(model, tokenizer, samples, max_new_tokens=max_new_tokens, slack=slack)
        if task == "video_evs":
            result.task = task
            result.scores = {k.replace("video_", "video_evs_"): v for k, v in result.scores.items()}
        scores.update(result.scores)
        results.append(result)
        if log is not None:
            text = " ".join(f"{k}={v:.4g}" for k, v in result.scores.items())
            log(f"{result.task}: {text} ({result.num_samples} samples, {result.seconds:.1f}s)")
    return scores, results
