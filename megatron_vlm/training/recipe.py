"""Stage recipes: YAML files validated against typed dataclasses before any compute starts.

A recipe may name a ``base`` recipe (path relative to itself); the two are deep-merged, so a stage
differs from its siblings by a few keys. Command-line overrides ``section.key=value`` (values parsed
as YAML) are applied last. Every problem is reported as one :class:`RecipeError` line naming the
file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from megatron_vlm.typed_config import build as build_typed


class RecipeError(ValueError):
    """A recipe is wrong; the message names the file and the key."""


FREEZABLE = ("vision", "connector", "llm")


@dataclass
class ModelSection:
    config: str                      # model YAML (recipes/models/...), relative to the repo root
    freeze: List[str] = field(default_factory=list)


@dataclass
class DataSource:
    path: str                        # shard directory (with manifest.json) or shard URL/glob
    weight: float = 1.0


@dataclass
class DataSection:
    blend: List[DataSource]
    tokenizer: str
    seq_length: int
    eval: List[DataSource] = field(default_factory=list)
    tile_size: int = 512             # must match the shards' manifest
    seed: int = 1234


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    cp_comm_type: str = "p2p"        # TE's context-parallel attention exchange (GPU): p2p | all_gather | a2a


@dataclass
class TrainSection:
    steps: int
    global_batch_size: int
    micro_batch_size: int = 1
    precision: str = "fp32"          # fp32 | bf16 | fp8 (fp8 needs TransformerEngine)
    seed: int = 1234
    skip_nan_steps: bool = False     # skip a step whose loss is NaN/inf instead of stopping
    max_wall_minutes: Optional[float] = None
    compile_cpu_ops: bool = False    # Mamba conv + scan through torch.compile where the GPU kernels do not run


@dataclass
class RecomputeSection:
    """Activation recompute (megatron's recompute_granularity / method / num_layers)."""
    mode: str = "none"               # none | selective (attention core) | full (whole layers)
    method: str = "uniform"          # full: uniform (every num_layers-layer chunk) | block
    num_layers: int = 1              # full: layers per chunk (uniform) / per stage (block)
    vision: bool = True              # also recompute the vision tower when mode != none


@dataclass
class Fp8Section:
    """TransformerEngine FP8 settings, used when train.precision == fp8."""
    recipe: str = "delayed"          # delayed | tensorwise | blockwise | mxfp8
    margin: int = 0
    amax_history_len: int = 1024


@dataclass
class OptimizerSection:
    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed: bool = True         # megatron's distributed optimizer (shards optimizer state)


@dataclass
class ScheduleSection:
    warmup_steps: int = 0
    decay: str = "cosine"            # cosine | linear | constant


@dataclass
class CheckpointSection:
    dir: str                         # this stage's checkpoints
    interval: int = 0                # steps between saves; 0 = only at the end
    init_from: Optional[str] = None  # previous stage's checkpoint dir: weights only
    keep: int = 2                    # newest checkpoints kept; 0 keeps all


@dataclass
class LoggingSection:
    interval: int = 1
    tensorboard: bool = True


@dataclass
class EvalSection:
    interval: int = 0                # steps between evaluations; 0 = only at the end
    batches: int = 4
    tasks: List[str] = field(default_factory=list)
    max_new_tokens: int = 32


@dataclass
class VideoSection:
    fps: float = 2.0                 # frames sampled per second of a clip
    max_frames: int = 128            # longer clips: this many frames spread uniformly
    evs_rate: float = 0.0            # EVS pruning rate q of video tokens (0 = off), train and eval
    evs_rate_sampling: str = "fixed"  # fixed | beta | uniform (training: a per-sample rate, see data/video.py)
    backend: str = "auto"            # auto | dali_gpu | dali_cpu | pyav (video_decode.py)


@dataclass
class Recipe:
    name: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    optimizer: OptimizerSection
    checkpoint: CheckpointSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    fp8: Fp8Section = field(default_factory=Fp8Section)
    video: VideoSection = field(default_factory=VideoSection)
    description: str = ""
    source: str = ""                 # the file it came from (filled in by load_recipe)


CHOICES = {
    "train.precision": ("fp32", "bf16", "fp8"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "parallel.cp_comm_type": ("p2p", "all_gather", "a2a"),
    "recompute.mode": ("none", "selective", "full"),
    "recompute.method": ("uniform", "block"),
    "fp8.recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "video.evs_rate_sampling": ("fixed", "beta", "uniform"),
    "video.backend": ("auto", "dali_gpu", "dali_cpu", "pyav"),
}


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise RecipeError(f"{path}: base recipes form a cycle")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml((path.parent / base).resolve(), seen + (path,)), raw)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    return f"not valid YAML: {where}{what}"


def apply_override(raw: dict, override: str, source: str) -> None:
    if "=" not in override:
        raise RecipeError(f"{source}: override {override!r} must look like section.key=value")
    dotted, value = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(k.strip() for k in keys):
        raise RecipeError(f"{source}: override {override!r}: empty key (section.key=value)")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{source}: override {dotted}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: override {dotted}: value {value!r} is {_yaml_problem(e)}") \
            from None


def _build(cls, raw, where: str, source: str):
    return build_typed(cls, raw, where, source, RecipeError, CHOICES, top="recipe")


def _check_finite(node, where: str, src: str) -> None:
    """Every float anywhere in the recipe (all sections, also ones added later) is finite."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), ".".join(filter(None, [where, f.name])), src)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check_finite(item, f"{where}[{i}]", src)
    elif isinstance(node, float) and not math.isfinite(node):
        raise RecipeError(f"{src}: {where}: must be a finite number, got {node}")


def _check_ranges(recipe: Recipe, src: str) -> None:
    """Values whose sign or range the types cannot express."""
    o, t = recipe.optimizer, recipe.train
    rules = [
        ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optimizer.adam_beta1", o.adam_beta1, 0 <= o.adam_beta1 < 1, "in [0, 1)"),
        ("optimizer.adam_beta2", o.adam_beta2, 0 <= o.adam_beta2 < 1, "in [0, 1)"),
        ("optimizer.adam_eps", o.adam_eps, o.adam_eps > 0, "> 0"),
        ("optimizer.clip_grad", o.clip_grad, o.clip_grad >= 0, ">= 0 (0 disables clipping)"),
        ("schedule.warmup_steps", recipe.schedule.warmup_steps,
         recipe.schedule.warmup_steps >= 0, ">= 0"),
        ("train.seed", t.seed, t.seed >= 0, ">= 0"),
        ("data.seed", recipe.data.seed, recipe.data.seed >= 0, ">= 0"),
        ("data.tile_size", recipe.data.tile_size, recipe.data.tile_size >= 1, ">= 1"),
        ("eval.max_new_tokens", recipe.eval.max_new_tokens, recipe.eval.max_new_tokens >= 1,
         ">= 1"),
    ]
    if t.max_wall_minutes is not None:
        rules.append(("train.max_wall_minutes", t.max_wall_minutes, t.max_wall_minutes > 0, "> 0"))
    for key, value, ok, rule in rules:
        if not ok:
            raise RecipeError(f"{src}: {key}: must be {rule}, got {value}")
    if t.global_batch_size % t.micro_batch_size:
        raise RecipeError(f"{src}: train.global_batch_size={t.global_batch_size} is not a "
                          f"multiple of train.micro_batch_size={t.micro_batch_size}")
    for key, value in (("checkpoint.dir", recipe.checkpoint.dir), ("model.config", recipe.model.config),
                       ("data.tokenizer", recipe.data.tokenizer)):
        if not value.strip():
            raise RecipeError(f"{src}: {key}: must not be empty")
    for section in ("blend", "eval"):
        for i, ds in enumerate(getattr(recipe.data, section)):
            if not ds.path.strip() or any(not part.strip() for part in ds.path.split("::")):
                raise RecipeError(f"{src}: data.{section}[{i}].path: empty path in {ds.path!r}")


def _check_values(recipe: Recipe, src: str) -> None:
    _check_finite(recipe, "", src)
    _check_ranges(recipe, src)
    positive = {"train.steps": recipe.train.steps,
                "train.global_batch_size": recipe.train.global_batch_size,
                "train.micro_batch_size": recipe.train.micro_batch_size,
                "data.seq_length": recipe.data.seq_length,
                "parallel.tp": recipe.parallel.tp, "parallel.pp": recipe.parallel.pp,
                "parallel.cp": recipe.parallel.cp, "logging.interval": recipe.logging.interval}
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{src}: {key}: must be >= 1, got {value}")
    if recipe.optimizer.lr <= 0 or recipe.optimizer.min_lr < 0 or \
            recipe.optimizer.min_lr > recipe.optimizer.lr:
        raise RecipeError(f"{src}: optimizer: need 0 <= min_lr <= lr and lr > 0, got "
                          f"lr={recipe.optimizer.lr} min_lr={recipe.optimizer.min_lr}")
    for part in recipe.model.freeze:
        if part not in FREEZABLE:
            raise RecipeError(f"{src}: model.freeze: {part!r} is not one of {FREEZABLE}")
    if set(recipe.model.freeze) == set(FREEZABLE):
        raise RecipeError(f"{src}: model.freeze: every part is frozen, nothing would train")
    if recipe.schedule.warmup_steps >= recipe.train.steps:
        raise RecipeError(f"{src}: schedule.warmup_steps={recipe.schedule.warmup_steps} must be "
                          f"below train.steps={recipe.train.steps}")
    for key, value in {"checkpoint.keep": recipe.checkpoint.keep,
                       "checkpoint.interval": recipe.checkpoint.interval,
                       "eval.interval": recipe.eval.interval}.items():
        if value < 0:
            raise RecipeError(f"{src}: {key}: must be >= 0, got {value}")
    for key, value in {"recompute.num_layers": recipe.recompute.num_layers,
                       "fp8.amax_history_len": recipe.fp8.amax_history_len}.items():
        if value < 1:
            raise RecipeError(f"{src}: {key}: must be >= 1, got {value}")
    if recipe.eval.batches < 1:
        raise RecipeError(f"{src}: eval.batches: must be >= 1, got {recipe.eval.batches}")
    _check_context_parallel(recipe, src)
    if recipe.parallel.sequence_parallel and recipe.parallel.tp == 1:
        raise RecipeError(f"{src}: parallel.sequence_parallel: needs tp > 1")
    if recipe.parallel.sequence_parallel and recipe.data.seq_length % recipe.parallel.tp:
        raise RecipeError(f"{src}: data.seq_length={recipe.data.seq_length} must be divisible by "
                          f"parallel.tp={recipe.parallel.tp} with sequence parallelism")
    if not recipe.data.blend:
        raise RecipeError(f"{src}: data.blend: needs at least one dataset")
    for i, ds in enumerate(recipe.data.blend):
        if ds.weight <= 0:
            raise RecipeError(f"{src}: data.blend[{i}].weight: must be > 0, got {ds.weight}")
    video = recipe.video
    if video.fps <= 0 or video.max_frames < 1:
        raise RecipeError(f"{src}: video: need fps > 0 and max_frames >= 1, got {video.fps}, {video.max_frames}")
    if not 0.0 <= video.evs_rate < 1.0:
        raise RecipeError(f"{src}: video.evs_rate: must be in [0, 1), got {video.evs_rate}")


def _check_context_parallel(recipe: Recipe, src: str) -> None:
    """CP cuts every packed sample into 2*cp chunks (and each rank's share over TP with sequence
    parallelism); a micro batch's rows go through the model as one THD row (training/vlm_step.py)."""
    p = recipe.parallel
    if p.cp == 1:
        return
    multiple = 2 * p.cp * (p.tp if p.sequence_parallel else 1)
    if recipe.data.seq_length % multiple:
        what = "2 x cp x tp (sequence parallelism)" if p.sequence_parallel else "2 x cp"
        raise RecipeError(f"{src}: data.seq_length={recipe.data.seq_length} must be divisible by "
                          f"{what} = {multiple} with parallel.cp={p.cp}")


def check_model_parallel(recipe: Recipe) -> None:
    """Parallel sizes against the model's heads (needs the model YAML): one line per problem."""
    p = recipe.parallel
    if p.cp == 1:
        return
    from megatron_vlm.models.config import load_vlm_config
    from megatron_vlm.models.context_parallel import check_mamba_cp_sizes  # imports megatron

    llm = load_vlm_config(recipe.model.config)["language_model"]
    heads, groups = llm["mamba_num_heads"], llm["mamba_num_groups"]
    if heads is None:
        heads = 2 * llm["hidden_size"] // llm["mamba_head_dim"]
    problem = check_mamba_cp_sizes(heads, groups, p.tp, p.cp)
    if problem:
        raise RecipeError(f"{recipe.source}: parallel.cp={p.cp}: {problem} "
                          f"({recipe.model.config}, tp={p.tp})")
    if p.cp_comm_type == "a2a":
        for key in ("num_attention_heads", "num_query_groups"):
            n = llm[key] or llm["num_attention_heads"]
            if (n // p.tp) % p.cp:
                raise RecipeError(f"{recipe.source}: parallel.cp_comm_type=a2a: {key}={n} per "
                                  f"tensor-parallel rank ({n // p.tp}) must be divisible by "
                                  f"cp={p.cp}; use p2p or all_gather")


def load_recipe(path, overrides: Optional[list] = None) -> Recipe:
    """Read, merge, override and type-check a recipe (no file-system or world-size checks)."""
    path = Path(path).resolve()
    return recipe_from_dict(read_recipe_yaml(path), str(path), overrides)


def read_recipe_yaml(path) -> dict:
    """A recipe file with its ``base`` chain merged, as a dict (not yet validated)."""
    return _read_yaml(Path(path).resolve())


def recipe_from_dict(raw: dict, source: str, overrides: Optional[list] = None) -> Recipe:
    """Override and type-check a recipe dict; ``source`` names it in errors."""
    raw = dict(raw)
    for override in overrides or []:
        apply_override(raw, override, source)
    recipe = _build(Recipe, raw, "", source)
    recipe.source = source
    _check_values(recipe, source)
    return recipe


def check_against_world(recipe: Recipe, world_size: int) -> int:
    """Parallel sizes and batch sizes against the world; returns the data-parallel size."""
    from megatron_vlm.distributed import ParallelConfigError, check_parallel_sizes

    p = recipe.parallel
    try:
        layout = check_parallel_sizes(world_size, p.tp, p.pp, p.cp)
    except ParallelConfigError as e:
        raise RecipeError(f"{recipe.source}: parallel: {e}") from None
    per_step = recipe.train.micro_batch_size * layout.dp
    if recipe.train.global_batch_size % per_step:
        raise RecipeError(
            f"{recipe.source}: train.global_batch_size={recipe.train.global_batch_size} is not a "
            f"multiple of micro_batch_size x data-parallel size = "
            f"{recipe.train.micro_batch_size} x {layout.dp}")
    return layout.dp


def _check_shard_tile_size(recipe: Recipe, key: str, path: Path) -> None:
    """Shards whose manifest (build_shards' index.json) names another tile size than the recipe's."""
    import json

    from megatron_vlm.data.loader import tile_size_problem
    from megatron_vlm.data.schema import MANIFEST_NAME

    manifest = path / MANIFEST_NAME if path.is_dir() else path
    if manifest.suffix != ".json" or not manifest.is_file():
        return
    try:
        content = json.loads(manifest.read_text())
        problem = tile_size_problem(content, recipe.data.tile_size, str(path))
    except (ValueError, KeyError, TypeError):
        raise RecipeError(f"{recipe.source}: {key}: {manifest} is not a shard manifest with "
                          "tiling.tile_size") from None
    if problem:
        raise RecipeError(f"{recipe.source}: {key}: {problem}")


def check_paths(recipe: Recipe) -> None:
    """Data, tokenizer and model config must exist (the model config valid) before any process
    starts computing."""
    from megatron_vlm.models.config import ModelConfigError, load_vlm_config

    try:  # a shipped config is found from anywhere (recipes/models/... in the installed package)
        load_vlm_config(recipe.model.config)
    except ModelConfigError as e:
        raise RecipeError(f"{recipe.source}: model.config: {e}") from None
    checks = [("data.tokenizer", recipe.data.tokenizer)]
    checks += [(f"data.blend[{i}].path", d.path) for i, d in enumerate(recipe.data.blend)]
    checks += [(f"data.eval[{i}].path", d.path) for i, d in enumerate(recipe.data.eval)]
    for key, spec in checks:
        for value in spec.split("::"):  # `a.tar::b.tar`: a list of shards, as the loader reads it
            if "://" in value or any(c in value for c in "{*"):
                continue  # URLs and brace/glob shard specs are resolved by the loader
            if not Path(value).expanduser().exists():  # relative to the working directory
                raise RecipeError(f"{recipe.source}: {key}: path does not exist: {value}")
            if key.startswith(("data.blend", "data.eval")):
                _check_shard_tile_size(recipe, key, Path(value).expanduser())
    check_model_parallel(recipe)
    if recipe.train.precision == "fp8":
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            raise RecipeError(f"{recipe.source}: train.precision: fp8 needs TransformerEngine, "
                              "which is not installed (use bf16 or fp32)") from None
