"""Bodies run under torchrun by test_evs_model.py: two EVS-pruned videos packed in one row vs
each alone, at TP=1/PP=1, TP=2 and PP=2, from the same initial weights.

Samples are synthetic token sequences in the prompt's video layout (``Frame i ... <img>`` +
provisional ``<image>`` counts + ``</img>``), so the test needs no tokenizer; the frames are
partly static (repeated tiles) so EVS keeps different counts per frame than the provisional ones.
"""

from __future__ import annotations

import torch

from megatron_vlm.distributed import initialize_distributed
from megatron_vlm.media_format import num_kept_tokens, provisional_frame_counts
from tests.parallel_utils import save_or_load
from tests.vision.reference import IMAGE_TOKEN_ID

IMG_START, IMG_END = 8, 9
SEQ, TILE, TPF, VOCAB, RATE = 160, 64, 4, 4096, 0.75
FRAMES = (6, 5)  # two videos


def video_sample(seed: int, frames: int, rate: float):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(10, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    keep = num_kept_tokens(frames, TPF, rate)
    ids = rand(4)
    for count in provisional_frame_counts(frames, TPF, keep):
        ids += rand(3) + [IMG_START] + [IMAGE_TOKEN_ID] * count + [IMG_END] + [11]
    question = len(ids)
    ids += rand(5)
    tokens = torch.tensor(ids)
    targets = torch.zeros(len(ids), dtype=torch.bool)
    targets[question + 1:] = True  # the answer
    base = torch.randn(3, TILE, TILE, generator=g)
    tiles = []
    for i in range(frames):  # frames 0,1 differ; then a static pair; then a moving corner
        if i % 3 == 2:
            base = base.clone()
            base[:, : TILE // 2, : TILE // 2] = torch.randn(3, TILE // 2, TILE // 2, generator=g)
        elif i % 3 == 1 and i > 1:
            pass  # identical to the previous frame: EVS drops it first
        else:
            base = base + 0.3 * torch.randn(3, TILE, TILE, generator=g)
        tiles.append(base)
    return {"tokens": tokens, "targets": targets, "tiles": torch.stack(tiles), "frames": frames, "keep": keep}


def pack(samples: list) -> dict:
    """One row [SEQ] holding the samples end to end (labels within a sample), then padding."""
    tokens = torch.zeros(1, SEQ, dtype=torch.long)
    labels = torch.zeros(1, SEQ, dtype=torch.long)
    loss_mask = torch.zeros(1, SEQ)
    bounds, pos = [0], 0
    for s in samples:
        n = len(s["tokens"])
        tokens[0, pos:pos + n] = s["tokens"]
        labels[0, pos:pos + n - 1] = s["tokens"][1:]
        loss_mask[0, pos:pos + n - 1] = s["targets"][1:].float()
        pos += n
        bounds.append(pos)
    assert pos < SEQ
    bounds.append(SEQ)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "tiles": torch.cat([s["tiles"] for s in samples]),
            "tiles_per_media": torch.tensor([s["frames"] for s in samples]),
            "media_tokens": torch.tensor([s["keep"] for s in samples]),
            "spans": bounds[:-1]}


def build():
    from megatron_vlm.models.vlm import build_vlm

    return build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID, img_end_token_id=IMG_END,
                     use_cpu_initialization=True)


def sample_losses(model, rows: list) -> list:
    """Forward-only through megatron's schedule; per row, the masked mean loss of each sample."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vlm.models.packing import make_packed_seq_params

    def forward_step(data_iterator, model_):
        b = next(data_iterator)
        out = model_(b["tokens"], tiles=b["tiles"], labels=b["labels"],
                     packed_seq_params=make_packed_seq_params(b["cu_seqlens"]),
                     tiles_per_media=b["tiles_per_media"], media_tokens=b["media_tokens"])
        return out, lambda o: (o.sum(), {"per_token": o.detach().flatten()})

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(rows), model=[model],
            num_microbatches=len(rows), seq_length=SEQ, micro_batch_size=1, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return []
    out = []
    for row, d in zip(rows, stored):
        losses, mask = d["per_token"], row["loss_mask"].flatten()
        bounds = row["spans"] + [SEQ]
        out.append([float((losses[a:b] * mask[a:b]).sum() / mask[a:b].sum())
                    for a, b in zip(bounds[:-1], bounds[1:]) if mask[a:b].sum() > 0])
    return out


def frame_counts(model, row: dict) -> list:
    """Per-frame <image> counts of the row's ids after EVS rebuilt the frame wrappers."""
    image = model.image_embeddings(row["tiles"])
    ids, kept = model.prune_videos(row["tokens"], image, row["tiles_per_media"], row["media_tokens"], TPF)
    flat, counts, inside = ids.flatten().tolist(), [], False
    for t in flat:
        if t == IMG_START:
            counts.append(0)
            inside = True
        elif t == IMG_END:
            inside = False
        elif t == IMAGE_TOKEN_ID and inside:
            counts[-1] += 1
    return {"counts": counts, "kept_embeddings": int(kept.shape[0])}


def run(tp: int = 1, pp: int = 1, init_ckpt: str = "", save_init: bool = False) -> dict:
    from megatron.core import parallel_state

    from megatron_vlm.training.vlm_step import vlm_forward_step
    from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
    from megatron_vlm.training.recipe import OptimizerSection
    from megatron_vlm.training.step import train_step

    initialize_distributed(tp=tp, pp=pp)
    model = build()
    save_or_load(model, init_ckpt, save_init)
    model.eval()
    a, b = video_sample(1, FRAMES[0], RATE), video_sample(2, FRAMES[1], RATE)
    rows = [pack([a, b]), pack([a]), pack([b])]
    result = {"losses": sample_losses(model, rows), "lengths": [len(a["tokens"]), len(b["tokens"])],
              "keeps": [a["keep"], b["keep"]], "stage": parallel_state.get_pipeline_model_parallel_rank()}
    if model.pre_process:
        with torch.no_grad():
            result.update(frame_counts(model, rows[0]))
    ddp = wrap_with_ddp([model], distributed_optimizer=False)
    optimizer = build_optimizer(ddp, OptimizerSection(lr=1e-3, adam_eps=1e-6, distributed=False))
    step = train_step(ddp, optimizer, iter(rows[:1]), num_microbatches=1, seq_length=SEQ,
                      micro_batch_size=1, forward_step_func=vlm_forward_step)
    result["step_loss"], result["grad_norm"] = step["loss"], step["grad_norm"]
    return result
