"""megatron-vlm: Nemotron Nano V2 VL-style training on megatron-core.

Extras:
  cpu  - the development set used on CPU machines and in CI (pinned, CPU torch build).
  dev  - cpu + test tools.
  gpu  - the CUDA kernels chosen automatically when importable (the Dockerfile installs these on
         top of the NGC PyTorch image, which already carries torch and apex).
"""

from setuptools import find_packages, setup

# What the library imports at run time on any machine. torch is deliberately not listed here:
# the NGC image brings its own CUDA build, and CPU machines take the pinned build from the
# `cpu` extra (a bare "torch" requirement would pull a multi-GB CUDA wheel).
RUNTIME = [
    "megatron-core==0.16.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "webdataset==1.0.2",
    "braceexpand==0.1.7",  # shard URL patterns (also a webdataset dependency)
    "pyyaml==6.0.4",
    "tensorboard==2.21.0",
    "pillow==13.0.0",
    "av==18.1.0",
    "einops==0.8.2",
    "numpy==2.4.6",
    # megatron's dist_checkpointing writer needs psutil but does not declare it; without it
    # a save hangs instead of failing.
    "psutil==7.2.2",
]

CPU = [
    "torch==2.13.0",
    "nvidia-dali-cuda120==2.4.0",  # CPU pipelines work without a driver
]

DEV = CPU + ["pytest==9.2.0"]

GPU = [
    "transformer-engine[pytorch]==2.20.2",
    "mamba-ssm==2.3.2.post1",
    "causal-conv1d==1.7.0",
    "flash-attn==2.8.3.post2",
    "nvidia-dali-cuda120==2.4.0",
]

setup(
    name="megatron-vlm",
    version="0.1.0",
    description="Megatron-style training of Nemotron Nano V2 VL-class vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vlm", "megatron_vlm.*"]) + ["megatron_vlm.recipes"],
    # The recipes ship inside the package (megatron_vlm/recipes/...) without moving the repo's
    # recipes/: models.config.recipes_root() finds them there when installed.
    package_dir={"megatron_vlm.recipes": "recipes"},
    package_data={"megatron_vlm.recipes": ["models/*.yaml", "tiny/*.yaml", "nano_v2_vl/*.yaml"]},
    install_requires=RUNTIME,
    extras_require={"cpu": CPU, "dev": DEV, "gpu": GPU},
    # The main commands on PATH (each is also `python -m <module>` from a checkout).
    entry_points={"console_scripts": [
        "mvlm-train = megatron_vlm.train:main",
        "mvlm-run-stages = megatron_vlm.cli.run_stages:main",
        "mvlm-convert = megatron_vlm.cli.convert_checkpoint:main",
        "mvlm-evaluate = megatron_vlm.cli.evaluate:main",
        "mvlm-plan = megatron_vlm.cli.plan:main",
        "mvlm-build-shards = megatron_vlm.data_prep.build_shards:main",
        "mvlm-inspect = megatron_vlm.data_prep.inspect:main",
    ]},
)
