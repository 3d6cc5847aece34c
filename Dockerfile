# GPU image for clusters: NGC PyTorch (CUDA torch, apex, NCCL) + the GPU extras of megatron-vlm.
# The CPU development set (CPU torch wheel) is deliberately not installed here.
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    NCCL_ASYNC_ERROR_HANDLING=1

WORKDIR /opt/megatron-vlm
COPY setup.py README.md ./
COPY megatron_vlm ./megatron_vlm
COPY tools ./tools
COPY recipes ./recipes
# The GPU smoke tests: `docker run --gpus all IMAGE make test-gpu`
COPY Makefile pytest.ini ./
COPY tests ./tests

# mamba-ssm, causal-conv1d and flash-attn compile against the image's torch: no build isolation.
# pytest (the dev pin) for `make test-gpu`; not the `dev` extra, which would pull the CPU torch.
RUN pip install --no-build-isolation -e ".[gpu]" pytest==9.2.0 \
 && python -c "import megatron.core, transformer_engine, mamba_ssm, causal_conv1d; print('GPU extras ok')"

CMD ["bash"]
