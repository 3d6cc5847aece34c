"""From a recipe's model section to this rank's model chunks, with the recipe's parts frozen."""

from __future__ import annotations

import torch

from megatron_vlm.training import checkpoint_meta
from megatron_vlm.training.recipe import RecipeError

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def recompute_overrides(section) -> dict:
    """The recipe's ``recompute`` section as megatron TransformerConfig fields."""
    if section.mode == "none":
        return {}
    if section.mode == "selective":
        # megatron's selective recompute: the attention core (softmax(QK^T)V), which holds the
        # s x s scores; the Mamba layers have no such term.
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": section.method,
            "recompute_num_layers": section.num_layers}


def fp8_overrides(section) -> dict:
    """The recipe's ``fp8`` section as TransformerConfig fields (TransformerEngine's recipes)."""
    # The hybrid format (e4m3 forward, e5m2 gradients) for delayed scaling, as in Megatron-LM's
    # FP8 runs; the block/MX recipes are defined for e4m3.
    return {"fp8": "hybrid" if section.recipe == "delayed" else "e4m3",
            "fp8_recipe": section.recipe, "fp8_margin": section.margin,
            "fp8_amax_history_len": section.amax_history_len}


def check_fp8_available(source: str, on_cpu: bool) -> None:
    """One line instead of an error deep inside the first layer."""
    if on_cpu:
        raise RecipeError(f"{source}: train.precision: fp8 needs a GPU with TransformerEngine; "
                          "CPU runs train in fp32 or bf16")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise RecipeError(f"{source}: train.precision: fp8 needs TransformerEngine, which is not "
                          "installed (use the Docker image, or bf16)") from None


def build_model_chunks(recipe):
    """Returns ([model], tokenizer, model_cfg); model_cfg carries what the data side needs."""
    from megatron_vlm.models import mamba_ops
    from megatron_vlm.models.vlm import build_vlm, load_vlm_config
    from megatron_vlm.platform import cpu_mode
    from megatron_vlm.training.data_setup import load_tokenizer

    if recipe.train.precision == "fp8":
        check_fp8_available(recipe.source, cpu_mode())
    mamba_ops.use_torch_compile(recipe.train.compile_cpu_ops)
    tokenizer = load_tokenizer(recipe)
    cfg = load_vlm_config(recipe.model.config)
    llm_vocab = cfg["language_model"]["vocab_size"]
    if tokenizer.vocab_size > llm_vocab:
        raise RecipeError(f"{recipe.source}: data.tokenizer has {tokenizer.vocab_size} tokens but "
                          f"the model's vocab_size is {llm_vocab}")
    overrides = {"params_dtype": PRECISION_DTYPES[recipe.train.precision],
                 "use_cpu_initialization": cpu_mode(),
                 "sequence_parallel": recipe.parallel.sequence_parallel,
                 "cp_comm_type": recipe.parallel.cp_comm_type}
    if recipe.train.precision != "fp32":
        overrides["bf16"] = True
    overrides.update(recompute_overrides(recipe.recompute))
    if recipe.train.precision == "fp8":
        overrides.update(fp8_overrides(recipe.fp8))
    freeze = {part: True for part in recipe.model.freeze}
    model = build_vlm(cfg, image_token_id=tokenizer.image_id, img_end_token_id=tokenizer.img_end_id,
                      freeze=freeze, vision_recompute=recipe.recompute.vision, **overrides)
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
