"""Export streams a checkpoint saved at pipeline parallel size 2 (layers split over two ranks'
files) to the same tensors as megatron's own resharding load of it into a TP=1 model."""

import pytest
import torch

from megatron_vlm.conversion import hf
from megatron_vlm.conversion.dist_reader import DistCheckpointReader
from megatron_vlm.conversion.safetensors_io import SafetensorsDirReader
from tests.conversion.conftest import REPO
from tests.multiproc import run_multiproc

IDS = {"vocab_size": 4096, "eos_id": 2, "pad_id": 0, "bos_id": None, "image_id": 7}


@pytest.mark.slow  # two torchrun ranks; TP=2 is covered in the default suite (test_convert_checkpoint)
def test_export_of_a_pp2_checkpoint_equals_megatrons_tp1_load(megatron_single, tmp_path):
    from megatron_vlm.models.vlm import build_vlm, load_vlm_config
    from megatron_vlm.training.checkpoint import load_checkpoint

    r = run_multiproc("tests.conversion.bodies:save_random_vlm", nproc=2, root=str(tmp_path / "pp2"),
                      tp=1, pp=2)
    step = r[0]["path"]
    cfg = load_vlm_config(str(REPO / "recipes/models/vlm_tiny.yaml"))
    reader = DistCheckpointReader(step)
    hf.export_hf(reader.read, reader.shapes(), cfg, "vlm", tmp_path / "streamed", IDS)

    model = build_vlm(cfg, image_token_id=7, use_cpu_initialization=True)
    load_checkpoint(step, [model])
    state = hf.full_state(model)
    assert set(reader.keys()) == set(state)
    assert sum(v.numel() for v in state.values()) == sum(x["local_params"] for x in r)
    hf.export_hf(state.__getitem__, {k: (v.shape, v.dtype) for k, v in state.items()}, cfg, "vlm",
                 tmp_path / "loaded", IDS)
    streamed = SafetensorsDirReader(tmp_path / "streamed").read_all()
    loaded = SafetensorsDirReader(tmp_path / "loaded").read_all()
    assert set(streamed) == set(loaded) and len(loaded) > 60
    assert all(torch.equal(streamed[k], v) for k, v in loaded.items())
