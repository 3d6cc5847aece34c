"""From a recipe's model section to this rank's model chunks, with the recipe's parts frozen."""

from __future__ import annotations

import torch

from megatron_vlm.training import checkpoint_meta
from megatron_vlm.training.recipe import RecipeError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def build_model_chunks(recipe):
    """Returns ([model], tokenizer, model_cfg); model_cfg carries what the data side needs."""
    from megatron_vlm.models.vlm import build_vlm, load_vlm_config
    from megatron_vlm.platform import cpu_mode
    from megatron_vlm.training.data_setup import load_tokenizer

    if recipe.parallel.vpp:
        raise RecipeError(f"{recipe.source}: parallel.vpp: virtual pipeline stages are not "
                          "supported by the VLM builder yet")
    if recipe.train.precision == "fp8" and cpu_mode():
        raise RecipeError(f"{recipe.source}: train.precision: fp8 needs a GPU with "
                          "TransformerEngine; CPU runs train in fp32 or bf16")
    tokenizer = load_tokenizer(recipe)
    cfg = load_vlm_config(recipe.model.config)
    llm_vocab = cfg["language_model"]["vocab_size"]
    if tokenizer.vocab_size > llm_vocab:
        raise RecipeError(f"{recipe.source}: data.tokenizer has {tokenizer.vocab_size} tokens but "
                          f"the model's vocab_size is {llm_vocab}")
    overrides = {"params_dtype": _DTYPES[recipe.train.precision],
                 "use_cpu_initialization": cpu_mode(),
                 "sequence_parallel": recipe.parallel.sequence_parallel}
    if recipe.train.precision != "fp32":
        overrides["bf16"] = True
    if recipe.train.precision == "fp8":
        overrides.update(fp8="e4m3", fp8_recipe="blockwise")
    freeze = {part: True for part in recipe.model.freeze}
    model = build_vlm(cfg, image_token_id=tokenizer.image_id, freeze=freeze, **overrides)
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError(
            f"{recipe.source}: model.freeze={recipe.model.freeze} leaves pipeline stage "
            "without trainable parameters; use fewer pipeline stages for this stage")
    if recipe.train.precision != "fp32":
        from megatron.core.transformer.module import Float16Module

        # megatron's mixed-precision wrapper: bf16 compute, fp32 loss; the optimizer keeps fp32
        # main weights.
        model = Float16Module(model.language_model.config, model)
    checkpoint_meta.register(recipe, cfg, tokenizer)  # written into every checkpoint
    model_cfg = {"vision": {"tile_size": recipe.data.tile_size,
                            "patch_size": cfg["vision_model"]["patch_size"],
                            "pixel_shuffle_ratio": cfg["downsample_ratio"]},
                 "vlm": cfg}
    return [model], tokenizer, model_cfg
