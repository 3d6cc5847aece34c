"""The full Nemotron-Nano-12B-v2 LLM config, built on the meta device, has the public size."""

import torch

PUBLIC_PARAMS = 12.31e9  # NVIDIA-Nemotron-Nano-12B-v2 (model card / safetensors index: 12.31B)


def test_12b_parameter_count(megatron_single):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from megatron_vlm.conversion.hf_mapping_llm import hf_config_kwargs
    from megatron_vlm.models.llm import build_hybrid_llm, count_parameters

    with torch.device("meta"):
        model = build_hybrid_llm("nemotron_h_12b", use_cpu_initialization=True,
                                 perform_initialization=False)
        hf = NemotronHForCausalLM(NemotronHConfig(**hf_config_kwargs("nemotron_h_12b")))
    assert all(p.device.type == "meta" for p in model.parameters())
    count = count_parameters(model)
    print(f"Nemotron-H 12B: {count:,} parameters")
    assert abs(count - PUBLIC_PARAMS) / PUBLIC_PARAMS < 0.01, count
    # Independent cross-check: transformers' own model of the same config.
    assert count == sum(p.numel() for p in hf.parameters())

    kinds = model.decoder.layer_type_list
    assert len(kinds) == 62 and kinds.count("M") == 28 and kinds.count("*") == 6 and kinds.count("-") == 28
    mixer = model.decoder.layers[0].mixer
    assert mixer.in_proj.weight.shape == (2 * 10240 + 2 * 8 * 128 + 128, 5120)
    assert mixer.conv1d.weight.shape == (10240 + 2 * 8 * 128, 1, 4)
    assert model.output_layer.weight.shape == (131072, 5120)
    assert model.embedding.word_embeddings.weight is not model.output_layer.weight  # untied
