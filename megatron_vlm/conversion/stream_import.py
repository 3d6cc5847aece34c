"""Hugging Face directories -> a megatron checkpoint, tensor by tensor (bounded memory).

The model is built on the ``meta`` device: it gives the checkpoint's structure (megatron's
sharded state dict: keys, global shapes, split factories, stacked layers) without any data.
The dist checkpoint is then written by PyTorch DCP with a planner that fills each meta tensor
only when the writer reaches it: the mapping rule that produces the tensor runs on the HF
tensors it needs (read from the safetensors), the result is written and dropped. Memory holds
one rule's tensors (a few, when the checkpoint splits one of our tensors into several, e.g. the
Mamba ``in_proj`` into ``.z .x .B .C .dt``), never the model.

Parts that no HF directory fills (e.g. the connector when the released LLM and RADIO tower are
imported separately) are built for real, with the recipe's initialisation, and written as they are.

The files are what ``dist_checkpointing.save`` writes (megatron's ``torch_dist`` backend: the
same DCP keys, its save planner, ``metadata.json``, ``common.pt``), only the tensor data arrives
late; ``training.checkpoint.load_checkpoint`` and ``dist_reader`` read them like any other.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_vlm.conversion import hf
from megatron_vlm.conversion.mapping import Rule
from megatron_vlm.conversion.safetensors_io import SafetensorsDirReader
from megatron_vlm.conversion import hf_mapping_vision as vis_map

PART_PREFIXES = {"language model": "language_model.", "vision tower": "vision_model.",
                 "connector": "vision_projection."}


class HFSources:
    """Which HF directory, rule and file names produce each of our tensors (a later directory
    wins where two fill the same tensor), checked against the model's names and shapes before
    any data is read."""

    def __init__(self, hf_dirs: Sequence[Path], vlm_cfg: dict,
                 ours_shapes: Dict[str, Tuple[torch.Size, torch.dtype]]):
        self.layouts: List[str] = []
        self._owner: Dict[str, Tuple[Rule, SafetensorsDirReader, Dict[str, str]]] = {}
        for hf_dir in hf_dirs:
            reader = SafetensorsDirReader(hf_dir)
            layout, rules, alias, dropped = hf.import_plan(reader.keys(), vlm_cfg)
            hf.check_import(rules, alias, dropped, reader.shapes(), ours_shapes, str(hf_dir))
            for key in reader.keys():  # HF-only tensors are dropped only when they are no-ops
                if dropped(key) and ("layer_scale" in key or "input_conditioner" in key):
                    vis_map.check_dropped(key, reader.read(key))
            for rule in rules:
                for key in rule.ours:
                    self._owner[key] = (rule, reader, alias)
            self.layouts.append(layout)

    def filled(self) -> set:
        return set(self._owner)

    def compute(self, key: str) -> Dict[str, torch.Tensor]:
        """The outputs of the rule that produces ``key`` (all of that rule's tensors)."""
        rule, reader, alias = self._owner[key]
        out = rule.to_ours(*(reader.read(alias.get(n, n)) for n in rule.hf))
        return dict(zip(rule.ours, out))


class TensorFeed:
    """Our tensors on demand, each made once per use count: a rule's other outputs wait in a
    cache until the writer has taken them as often as the checkpoint uses them."""

    def __init__(self, sources: HFSources, params: Dict[str, torch.Tensor], uses: Counter,
                 on_tensor: Callable[[], None] = lambda: None):
        self.sources, self.params, self.left, self.on_tensor = sources, params, uses, on_tensor
        self._cache: Dict[str, torch.Tensor] = {}

    def _prepared(self, key: str, t: torch.Tensor) -> torch.Tensor:
        like = self.params[key]
        return t.to(dtype=like.dtype).reshape(like.shape).contiguous()

    def get(self, key: str) -> torch.Tensor:
        t = self._cache.get(key)
        if t is None:
            for name, value in self.sources.compute(key).items():
                if name == key:
                    t = self._prepared(name, value)
                elif self.left.get(name, 0) > 0 and name not in self._cache:
                    self._cache[name] = self._prepared(name, value)
        self.left[key] -= 1
        if self.left[key] <= 0:
            self._cache.pop(key, None)
            self.on_tensor()
        elif key not in self._cache:
            self._cache[key] = t
        return t


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def build_meta_model(vlm_cfg: dict, image_token_id: int, img_end_token_id: Optional[int],
                     params_dtype: torch.dtype):
    """The VLM with every parameter on the meta device (no memory, no initialisation)."""
    from megatron_vlm.models.vlm import build_vlm

    with torch.device("meta"):
        return build_vlm(vlm_cfg, image_token_id=image_token_id, img_end_token_id=img_end_token_id,
                         params_dtype=params_dtype, use_cpu_initialization=True,
                         perform_initialization=False)


def materialise_parts(model, vlm_cfg: dict, parts: Sequence[str], params_dtype: torch.dtype) -> None:
    """Replace the named parts of a meta-built VLM by freshly initialised real ones (as
    ``build_vlm`` builds them)."""
    from megatron_vlm.models.connector import build_connector
    from megatron_vlm.models.llm import build_hybrid_llm
    from megatron_vlm.models.vision.radio import build_radio_tower
    from megatron_vlm.platform import cpu_mode

    overrides = dict(params_dtype=params_dtype, use_cpu_initialization=cpu_mode())
    for part in parts:
        if part == "language model":
            # Only the LLM's weights are saved; the VLM keeps its own wiring to the meta LLM.
            model.language_model = build_hybrid_llm(
                vlm_cfg["language_model"], scatter_embedding_sequence_parallel=False, **overrides)
        elif part == "vision tower":
            model.vision_model = build_radio_tower(vlm_cfg["vision_model"], **overrides)
        else:
            import dataclasses

            # The meta LLM's config skips initialisation; the connector's is derived from it.
            base = dataclasses.replace(model.language_model.config, perform_initialization=True,
                                       use_cpu_initialization=cpu_mode())
            model.vision_projection = build_connector(
                base, vision_hidden=vlm_cfg["vision_model"]["hidden_size"],
                llm_hidden=vlm_cfg["language_model"]["hidden_size"],
                projector_hidden=vlm_cfg["projector_hidden_size"],
                downsample_ratio=vlm_cfg["downsample_ratio"], norm_eps=vlm_cfg["projector_norm_eps"])


def _meta_views(sharded_state_dict, key_of: Dict[int, str]) -> Dict[tuple, tuple]:
    """(checkpoint key, global offset) -> (our key, size, stride, storage offset) of every
    megatron ShardedTensor whose data is a meta view of one of our parameters (read before the
    conversion to DCP, which detaches the views from their parameters)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    views = {}
    for sh in nested_values(sharded_state_dict):
        if isinstance(sh, ShardedTensor) and sh.data is not None and sh.data.is_meta:
            t = sh.data
            views[(sh.key, tuple(sh.global_offset))] = (
                key_of[id(_root(t))], t.size(), t.stride(), t.storage_offset())
    return views


def streaming_save_strategy(model, sources: HFSources, progress: bool = False):
    """A megatron ``torch_dist`` save strategy that fills the meta tensors of ``model`` from
    ``sources`` while writing (pass it to ``checkpoint.save_checkpoint``)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    params = {k: v for k, v in model.state_dict(keep_vars=True).items()
              if isinstance(v, torch.Tensor)}
    key_of = {id(v): k for k, v in params.items() if v.is_meta}

    class FillingPlanner(MCoreSavePlanner):
        feed: TensorFeed = None
        views: Dict[tuple, tuple] = None

        def resolve_data(self, write_item):
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and obj.is_meta:
                index = write_item.index
                key, size, stride, offset = self.views[(index.fqn, tuple(index.offset))]
                # The meta tensor is a view (a factory's split, a stacked layer's row) of one of
                # our parameters: the same view of the real tensor, shaped as the DCP chunk.
                obj = self.feed.get(key).as_strided(size, stride, offset).reshape(obj.shape)
            return self.transform_object(write_item, obj)

    class StreamingSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path):
            views = _meta_views(sharded_state_dict, key_of)
            uses = Counter(key for key, *_ in views.values())
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            bar = hf.progress_bar(len(uses), f"import -> {Path(checkpoint_dir).parent.name}", progress)
            planner = FillingPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                     flatten_state_dict=False)
            planner.views = views
            planner.feed = TensorFeed(sources, params, uses, on_tensor=lambda: bar.update(1))
            # One thread: the writer resolves the tensors in order, one at a time. One file per
            # tensor: PyTorch's writer keeps every tensor of a file referenced until the file is
            # closed (torch 2.13, for its safetensors format), so one file per rank would hold
            # the whole model.
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False,
                                      thread_count=1)
            try:
                dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
            finally:
                bar.close()
            left = {k: n for k, n in planner.feed.left.items() if n > 0}
            if left:
                raise RuntimeError(f"import: tensors never written: {sorted(left)[:8]}")

    return StreamingSave("torch_dist", 1, thread_count=1)


def fresh_parts(model_keys, filled: set) -> List[str]:
    """The parts no HF directory fills; a part filled only in part is an error naming what is
    missing (the mapping tables cover whole parts)."""
    fresh = []
    for part, prefix in PART_PREFIXES.items():
        keys = {k for k in model_keys if k.startswith(prefix)}
        missing = sorted(keys - filled)
        if keys and len(missing) == len(keys):
            fresh.append(part)
        elif missing:
            raise ValueError(f"the HF directories fill the {part} only in part; missing: "
                             f"{missing[:8]}")
    return fresh
