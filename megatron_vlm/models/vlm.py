"""Nemotron Nano V2 VL-style model: RADIO tower + pixel-shuffle connector + hybrid Nemotron-H LLM.

    model = build_vlm("vlm_tiny", image_token_id=tokenizer.image_id)   # after initialize_distributed
    model.freeze(vision=True, llm=True)                                # Stage 0: connector only
    loss = model(tokens, tiles=tiles, labels=labels)                   # per-token loss [b, s]
    logits = model(tokens, tiles=tiles)                                # [b, s, vocab/tp]

Inputs follow the data pipeline's batch contract: ``tokens`` [b, s]; ``tiles`` [N, 3, T, T]
(CLIP-normalised; or the shards' uint8 [N, T, T, 3], normalised on the device) in the order their ``<image>`` context tokens appear in the batch-major
flattening of ``tokens``; each tile stands for ``(T/patch)^2 * ratio^2`` context tokens (256 for
512 px tiles). Samples may have any number of tiles, including none; ``tiles`` may be None or
empty when the batch has no image tokens.

Data flow on the first pipeline stage: tiles -> ``vision_model`` (patch features) ->
``vision_projection`` (pixel shuffle + mlp1) -> one embedding per ``<image>`` token, written over
the LLM's text embeddings at those positions, in tile order -> ``language_model`` as
``decoder_input``. Other pipeline stages hold only their share of LLM layers and take their input
through ``set_input_tensor`` (megatron's schedules do this).

EVS (video token pruning, ``evs.py``) runs between the connector and that write. Sequence layout:
the data pipeline fixes each pruned video's kept count ``K = num_kept_tokens(T, tpf, q)`` when
it encodes the sample (batch key ``media_tokens``), so the sample's length, labels, loss mask,
``cu_seqlens`` and every pipeline/tensor-parallel shape are final before the vision pass. It
writes provisional per-frame counts (frame 1 whole, the rest spread evenly) in the
``Frame i sampled at t seconds: <img>...</img>`` wrappers. After pruning, ``embed_inputs`` moves the
video's ``<image>`` ids to each frame's real kept count, keeping every frame's timestamp text and
``<img>``/``</img>`` wrapper (as vLLM rebuilds the placeholders); only ids inside the video move,
none of which is a loss target, and no position ids change (the LLM has no positional encoding).

Freezing (``freeze``) sets ``requires_grad = False``. A frozen vision tower runs under
``torch.no_grad()`` (and so does a frozen connector behind it); a frozen LLM keeps building the
graph of its activations, because gradients must flow through it to the connector, but its
parameters get none. Freeze before wrapping in megatron's DDP: DDP only allocates gradient
buffers for trainable parameters.

Checkpoints: ``sharded_state_dict`` (megatron dist_checkpointing) gives ``language_model.*`` on
every stage and ``vision_model.*`` / ``vision_projection.*`` on the first, so a checkpoint saved at
one TP/PP layout loads at any other.
"""

from contextlib import nullcontext
from typing import Dict, Optional, Union

import torch

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_vlm.media_format import CLIP_MEAN, CLIP_STD
from megatron_vlm.models.config import load_vlm_config
from megatron_vlm.models.connector import VisionConnector, build_connector
from megatron_vlm.models.context_parallel import global_cu_seqlens, shard_sequence, shard_tokens
from megatron_vlm.models.evs import kept_per_frame, retention_mask
from megatron_vlm.models.llm import build_hybrid_llm
from megatron_vlm.models.vision.radio import RadioVisionTower, build_radio_tower

# Freezable parts and the attributes (= checkpoint prefixes) that hold them.
PART_ATTRIBUTES = {"vision": "vision_model", "connector": "vision_projection", "llm": "language_model"}



class ImageTokenMismatch(ValueError):
    """The number of ``<image>`` tokens differs from the number of tile embeddings."""


def normalize_uint8_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, T, T, 3] (the shards' layout) -> CLIP-normalised float32 [N, 3, T, T], computed
    on the tiles' device: a quarter of the host work and host-to-device bytes of float tiles."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles [N, T, T, 3], got {tuple(tiles.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    x = tiles.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).contiguous()


def _grad_context(frozen: bool):
    return torch.no_grad() if frozen else nullcontext()


def _is_frozen(module: Optional[torch.nn.Module]) -> bool:
    return module is not None and not any(p.requires_grad for p in module.parameters())


class NemotronVLModel(MegatronModule):
    """Vision tower + connector (first pipeline stage only) + hybrid LLM, as one megatron module."""

    def __init__(
        self,
        language_model: MegatronModule,
        vision_model: Optional[RadioVisionTower] = None,
        vision_projection: Optional[VisionConnector] = None,
        image_token_id: Optional[int] = None,
        img_end_token_id: Optional[int] = None,
    ):
        super().__init__(config=language_model.config)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        if self.pre_process and (vision_model is None or vision_projection is None):
            raise ValueError("the first pipeline stage needs the vision tower and the connector")
        if not self.pre_process and (vision_model is not None or vision_projection is not None):
            raise ValueError("the vision tower and the connector live on the first stage only")
        self.language_model = language_model
        self.vision_model = vision_model
        self.vision_projection = vision_projection
        self.image_token_id = image_token_id
        self.img_end_token_id = img_end_token_id  # ``</img>``: frame wrappers rebuilt after EVS
        # megatron's finalize_model_grads reads these from the module that has ``pre_process``.
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.sequence_parallel = language_model.config.sequence_parallel
        if self.pre_process and self.sequence_parallel and \
                language_model.embedding.scatter_to_sequence_parallel:
            # Image embeddings are written at arbitrary sequence positions, so the text embeddings
            # must come whole; the VLM scatters the spliced result itself (as megatron's LLaVA).
            raise ValueError("with sequence parallelism the VLM's LLM must be built with "
                             "scatter_embedding_sequence_parallel=False (build_vlm does)")

    # ---- megatron plumbing ------------------------------------------------------------------
    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Activations from the previous pipeline stage go to the LLM's layers."""
        self.language_model.set_input_tensor(input_tensor)

    # ---- freezing ---------------------------------------------------------------------------
    def _parts(self) -> Dict[str, Optional[torch.nn.Module]]:
        return {part: getattr(self, attr) for part, attr in PART_ATTRIBUTES.items()}

    def freeze(self, vision: bool = False, connector: bool = False, llm: bool = False) -> None:
        """Freeze (True) or make trainable (False) each part held by this pipeline stage."""
        parts = self._parts()
        for name, frozen in (("vision", vision), ("connector", connector), ("llm", llm)):
            module = parts[name]
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(not frozen)

    def frozen_parts(self) -> Dict[str, Optional[bool]]:
        """Per part: True frozen, False trainable, None not on this pipeline stage."""
        return {name: (None if m is None else _is_frozen(m)) for name, m in self._parts().items()}

    # ---- vision path --------------------------------------------------------------------------
    def tokens_per_tile(self, tiles: torch.Tensor) -> int:
        rows, cols = self.vision_model.grid_dims(tiles.shape[-2], tiles.shape[-1])
        merge = round(1 / self.vision_projection.downsample_ratio)
        if rows % merge or cols % merge:
            raise ValueError(f"tiles of {tiles.shape[-2]}x{tiles.shape[-1]} px give a {rows}x{cols} "
                             f"patch grid, not divisible by the pixel-shuffle merge factor {merge}")
        return (rows // merge) * (cols // merge)

    def image_embeddings(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, T, T] -> one LLM embedding per image token, [N * tokens_per_tile, h]."""
        grid = self.vision_model.grid_dims(tiles.shape[-2], tiles.shape[-1])
        tiles = tiles.to(self.vision_model.config.params_dtype)  # data is fp32; the tower may be bf16
        vision_frozen = _is_frozen(self.vision_model)
        with _grad_context(vision_frozen):
            features = self.vision_model(tiles)
        with _grad_context(vision_frozen and _is_frozen(self.vision_projection)):
            embeds = self.vision_projection(features, grid)
        return embeds.reshape(-1, embeds.shape[-1])

    def _check_image_tokens(self, input_ids: torch.Tensor, tiles: Optional[torch.Tensor],
                            num_embeddings: Optional[int] = None) -> torch.Tensor:
        """Boolean [b, s] mask of the image context tokens, after checking their count."""
        num_tiles = 0 if tiles is None else int(tiles.shape[0])
        if self.image_token_id is None:
            if num_tiles:
                raise ValueError("image_token_id is not set: cannot place the tile embeddings")
            return torch.zeros_like(input_ids, dtype=torch.bool)
        mask = input_ids == self.image_token_id
        num_tokens = int(mask.sum())
        per_tile = self.tokens_per_tile(tiles) if num_tiles else 0
        expected = num_tiles * per_tile if num_embeddings is None else num_embeddings
        if num_tokens != expected:
            raise ImageTokenMismatch(
                f"the batch has {num_tokens} image context tokens (id {self.image_token_id}) but "
                f"{expected} tile embeddings ({num_tiles} tiles x {per_tile} tokens "
                f"per tile{', after EVS' if num_embeddings is not None else ''})")
        return mask

    # ---- EVS ----------------------------------------------------------------------------------
    def prune_videos(self, input_ids: torch.Tensor, image: torch.Tensor, tiles_per_media: torch.Tensor,
                     media_tokens: torch.Tensor, tokens_per_tile: int):
        """EVS on the videos whose ``media_tokens`` is below tiles x tokens_per_tile: returns
        (input ids with each pruned video's frame wrappers rebuilt, the kept embeddings)."""
        tiles_per_media = tiles_per_media.tolist()
        media_tokens = media_tokens.tolist()
        full = [n * tokens_per_tile for n in tiles_per_media]
        if not any(0 <= k < f for k, f in zip(media_tokens, full)):
            return input_ids, image
        if self.img_end_token_id is None:
            raise ValueError("img_end_token_id is not set: cannot rebuild the frames of a pruned video")
        flat = input_ids.reshape(-1).clone()  # batch-major, the order of the image embeddings
        positions = (flat == self.image_token_id).nonzero(as_tuple=True)[0]
        kept, offset, token_cursor = [], 0, 0
        for frames, want, count in zip(tiles_per_media, media_tokens, full):
            embeds = image[offset : offset + count]
            offset += count
            if not 0 <= want < count:
                kept.append(embeds)
                token_cursor += count
                continue
            mask = retention_mask(embeds, frames, want)
            kept.append(embeds[mask])
            first = int(positions[token_cursor])
            token_cursor += want
            self._rebuild_frames(flat, first, kept_per_frame(mask, frames).tolist())
        return flat.view_as(input_ids), torch.cat(kept)

    def _rebuild_frames(self, flat: torch.Tensor, first: int, counts: list) -> None:
        """Rewrite in place the ids of a video from its first ``<image>`` to its last ``</img>``
        so that frame i holds ``counts[i]`` image tokens (the text between frames is kept)."""
        ends = (flat[first:] == self.img_end_token_id).nonzero(as_tuple=True)[0][: len(counts)] + first
        if len(ends) < len(counts):
            raise ImageTokenMismatch(f"a pruned video has {len(ends)} </img> of {len(counts)} frames")
        span = flat[first : int(ends[-1]) + 1]
        text = span[span != self.image_token_id]
        text_ends = (text == self.img_end_token_id).nonzero(as_tuple=True)[0].tolist()
        image_id = span.new_full((1,), self.image_token_id)
        pieces, start = [], 0
        for count, end in zip(counts, text_ends):  # segment i: text before frame i's tokens, </img>
            pieces += [text[start:end], image_id.expand(int(count)), text[end : end + 1]]
            start = end + 1
        rebuilt = torch.cat(pieces)
        if rebuilt.numel() != span.numel():
            raise ImageTokenMismatch("EVS kept counts do not match the video's image tokens")
        span.copy_(rebuilt)

    def embed_inputs(self, input_ids: torch.Tensor, tiles: Optional[torch.Tensor] = None,
                     tiles_per_media: Optional[torch.Tensor] = None,
                     media_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LLM input embeddings [s, b, h]: text embeddings with image tokens replaced, in tile order
        (after EVS pruning of the videos that ``media_tokens`` marks, see the module docstring)."""
        if tiles is not None and tiles.numel() == 0:
            tiles = None
        if tiles is not None and tiles.dtype == torch.uint8:
            tiles = normalize_uint8_tiles(tiles)
        image = num_embeddings = None
        if tiles is not None and media_tokens is not None and tiles_per_media is not None:
            per_tile = self.tokens_per_tile(tiles)
            image = self.image_embeddings(tiles)
            input_ids, image = self.prune_videos(input_ids, image, tiles_per_media, media_tokens, per_tile)
            num_embeddings = int(image.shape[0])
        mask = self._check_image_tokens(input_ids, tiles, num_embeddings)
        text = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if tiles is None:
            return text
        image = (self.image_embeddings(tiles) if image is None else image).to(text.dtype)
        seq, batch, hidden = text.shape
        # Tile order is the batch-major order of the tokens; the embeddings are sequence-major.
        b_idx, s_idx = mask.nonzero(as_tuple=True)
        rows = s_idx * batch + b_idx
        return text.reshape(seq * batch, hidden).index_copy(0, rows, image).view(seq, batch, hidden)

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        tiles: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        attention_mask: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        tiles_per_media: Optional[torch.Tensor] = None,
        media_tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-token loss [b, s] with ``labels`` (last stage), else logits [b, s, vocab/tp]
        (last stage) or hidden states [s, b, h] (other stages).

        ``input_ids`` and ``tiles`` are read on the first stage only. ``packed_seq_params``
        (``make_packed_seq_params(cu_seqlens)``) keeps packed samples apart in the LLM.
        ``tiles_per_media`` / ``media_tokens`` (batch keys) switch on EVS for the videos they mark.
        """
        if packed_seq_params is not None and input_ids is not None and input_ids.shape[0] > 1:
            # megatron's packed (THD) layout has b = 1; otherwise attention fails deep inside torch
            raise ValueError(f"packed rows go through the model as one row: got input_ids of shape "
                             f"{tuple(input_ids.shape)} with packed_seq_params; pass "
                             "input_ids.reshape(1, -1) (training/vlm_step.py as_one_row)")
        decoder_input = None
        # Context parallelism: the whole sequence is embedded (image embeddings land on their
        # placeholders wherever the CP split falls), then cut to this rank's tokens.
        cu_seqlens = global_cu_seqlens(packed_seq_params)
        labels = shard_tokens(labels, cu_seqlens)
        if self.pre_process:
            decoder_input = self.embed_inputs(input_ids, tiles, tiles_per_media, media_tokens)
            decoder_input = shard_sequence(decoder_input, cu_seqlens)
            if self.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(
            input_ids=None, position_ids=None, attention_mask=attention_mask,
            decoder_input=decoder_input, labels=labels, packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """dist_checkpointing state: each part under its own prefix, with the part's own sharding
        (the LLM's layers carry global layer numbers, so any PP layout maps onto the same keys)."""
        assert not sharded_offsets, "unexpected sharded offsets"
        state = {}
        for part, attr in PART_ATTRIBUTES.items():
            module = getattr(self, attr)
            if module is not None:
                state.update(module.sharded_state_dict(f"{prefix}{attr}.", (), metadata))
        return state


def build_vlm(
    vlm_cfg: Union[str, dict],
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    impl: str = "auto",
    image_token_id: Optional[int] = None,
    freeze: Optional[Dict[str, bool]] = None,
    vision_recompute: bool = True,
    img_end_token_id: Optional[int] = None,
    **config_overrides,
) -> NemotronVLModel:
    """Build this pipeline stage's part of the VLM from a recipe name / YAML path / dict.

    ``config_overrides`` go to both the LLM's and the tower's TransformerConfig (e.g.
    ``params_dtype="float32"``, ``use_cpu_initialization=True``, ``perform_initialization=False``).
    ``image_token_id`` overrides the YAML's (take it from the tokenizer: ``VLMTokenizer.image_id``).
    ``freeze``: e.g. ``{"vision": True, "llm": True}`` for Stage 0.
    ``vision_recompute=False`` keeps ``recompute_*`` overrides away from the vision tower.
    """
    cfg = load_vlm_config(vlm_cfg)
    language_model = build_hybrid_llm(cfg["language_model"], pre_process, post_process, impl=impl,
                                      scatter_embedding_sequence_parallel=False,
                                      **config_overrides)
    vision_model = vision_projection = None
    if language_model.pre_process:
        # The tower runs on whole tiles: the LLM's sequence parallelism does not apply to it.
        vision_overrides = {k: v for k, v in config_overrides.items() if k != "sequence_parallel"
                            and (vision_recompute or not k.startswith("recompute_"))}
        vision_model = build_radio_tower(cfg["vision_model"], impl=impl, **vision_overrides)
        vision_projection = build_connector(
            language_model.config,
            vision_hidden=cfg["vision_model"]["hidden_size"],
            llm_hidden=cfg["language_model"]["hidden_size"],
            projector_hidden=cfg["projector_hidden_size"],
            downsample_ratio=cfg["downsample_ratio"],
            norm_eps=cfg["projector_norm_eps"],
            impl=impl,
        )
    model = NemotronVLModel(
        language_model, vision_model, vision_projection,
        image_token_id=image_token_id if image_token_id is not None else cfg["image_token_id"],
        img_end_token_id=img_end_token_id if img_end_token_id is not None else cfg["img_end_token_id"],
    )
    if freeze:
        unknown = set(freeze) - set(PART_ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown parts to freeze: {sorted(unknown)}")
        model.freeze(**freeze)
    return model
