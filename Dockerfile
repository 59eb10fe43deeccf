# megatron-rence on NVIDIA's PyTorch container: Python 3.12, PyTorch 2.8.0a0 (NVIDIA build), CUDA 12.9,
# Transformer Engine and apex come with the base image; this adds SGLang (colocated rollouts), megatron-core,
# math-verify and the project, every version pinned. (FP8 rollout weights need no extra package: the sync
# stream quantises them itself, megatron_rence/weights/quantize.py.)
#
#   docker build -t <registry>/megatron-rence:0.1.0 .
#   docker push <registry>/megatron-rence:0.1.0
#   enroot import -o megatron-rence.sqsh docker://<registry>#megatron-rence:0.1.0     (docker/README.md)
#
# Not built in this repository's CI (no Docker engine, no GPU there); tests/unit/test_slurm_container.py checks
# that every pip package is pinned and that the base image is an nvcr.io PyTorch tag.
FROM nvcr.io/nvidia/pytorch:25.06-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

# 1. SGLang without its dependencies: its torch==2.8.0 pin would replace the image's torch build (NGC's
#    /etc/pip/constraint.txt refuses that anyway), which Transformer Engine and apex are compiled against.
RUN pip install --no-deps sglang==0.5.5.post3

# 2. SGLang's own dependencies, pinned; the packages the image already ships keep the image's versions.
COPY docker/requirements-sglang.txt /tmp/requirements-sglang.txt
RUN pip install -r /tmp/requirements-sglang.txt

# 3. The trainer side: megatron-core (the version CI tests on CPU) and the verifier.
RUN pip install megatron-core==0.16.1 "math-verify[antlr4_13_2]==0.9.0"

# 4. The project (editable, so a checkout mounted over /opt/megatron-rence runs as is); its dependencies
#    are all installed above or by the image.
#    Only what the package and the launches need: no .venv, runs/ or caches from a developer checkout.
COPY setup.py /opt/megatron-rence/setup.py
COPY megatron_rence /opt/megatron-rence/megatron_rence
COPY recipes /opt/megatron-rence/recipes
COPY slurm /opt/megatron-rence/slurm
RUN pip install --no-deps -e /opt/megatron-rence

# Fail the build, not the first job, when an import is broken.
RUN python -c "import torch, transformer_engine, apex, megatron.core, sglang, sgl_kernel, flashinfer, \
math_verify, megatron_rence; print('torch', torch.__version__, 'sglang', sglang.__version__)"

WORKDIR /opt/megatron-rence
