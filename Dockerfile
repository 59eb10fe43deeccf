# megatron-rence on NVIDIA's NGC CUDA deep-learning base (CUDA 12.9, cuDNN, NCCL, HPC-X, Ubuntu 24.04; no
# torch in it), as NeMo-RL does: the RELEASED torch 2.8.0 and SGLang 0.5.5.post3 from PyPI (so sgl-kernel's
# wheel matches torch by construction), Transformer Engine 2.9 COMPILED HERE against that torch,
# megatron-core, math-verify, tensorboard and the project, every version pinned. docker/README.md says why
# this base and not NGC PyTorch or SGLang's own image.
#
#   docker build -t <registry>/megatron-rence:0.1.0 .
#   docker push <registry>/megatron-rence:0.1.0
#   enroot import -o megatron-rence.sqsh docker://<registry>#megatron-rence:0.1.0     (docker/README.md)
#
# Not built in this repository's CI (no Docker engine, no GPU there); tests/unit/test_slurm_container.py checks
# the base, that every pip package is pinned, the version checks and the driver-free import check.
FROM nvcr.io/nvidia/cuda-dl-base:25.06-cuda12.9-devel-ubuntu24.04

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    DEBIAN_FRONTEND=noninteractive

# 1. Python 3.12 (Ubuntu 24.04's) in a virtual environment: the system interpreter is "externally managed".
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

# 2. The released torch 2.8.0 and SGLang 0.5.5.post3 from PyPI, with the versions SGLang's release pins
#    (sgl-kernel 0.3.17.post1 is built against the released torch 2.8.0; NGC PyTorch's 2.8.0a0 builds do not
#    export the same symbols). transformers 4.57.1 is SGLang's pin: the project's code runs with it.
RUN python3 -m pip install torch==2.8.0 sglang==0.5.5.post3 sgl-kernel==0.3.17.post1 transformers==4.57.1

# 3. Fail here, before anything is compiled, if pip resolved anything else.
COPY docker/check_versions.py /opt/check_versions.py
RUN python3 /opt/check_versions.py

# 4. Transformer Engine: the core library as a binary wheel, the PyTorch extension compiled from its sdist
#    against the torch above (--no-build-isolation), for Ampere and Hopper, with the base's CUDA 12.9 and
#    cuDNN. megatron-core 0.16.1 asks for TE >= 2.9 (< 2.12); TE's FusedAdam replaces apex's.
RUN python3 -m pip install pybind11==3.0.1 ninja==1.13.0
RUN NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="80;90" MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation transformer-engine[core_cu12,pytorch]==2.9.0

# 5. The trainer side and what the default recipes use: megatron-core (the version CI tests on CPU), the
#    verifier, tensorboard (logging.tensorboard=true), psutil (torch_dist checkpoint writer), pyyaml, tqdm, and
#    NVIDIA Model Optimizer for the quantized export (tools/export_megatron_to_hf.py --quant; 0.46.1 is the
#    newest that imports with megatron-core 0.16.1).
RUN python3 -m pip install megatron-core==0.16.1 "math-verify[antlr4_13_2]==0.9.0" tensorboard==2.20.0 \
    psutil==7.0.0 pyyaml==6.0.2 tqdm==4.67.1 nvidia-modelopt==0.46.1

# 6. The project (editable, so a checkout mounted over /opt/megatron-rence runs as is), without dependencies:
#    every one is installed above at an exact version. Only what the package and the launches need.
COPY setup.py /opt/megatron-rence/setup.py
COPY megatron_rence /opt/megatron-rence/megatron_rence
COPY recipes /opt/megatron-rence/recipes
COPY slurm /opt/megatron-rence/slurm
RUN python3 -m pip install --no-deps -e /opt/megatron-rence

# Fail the build, not the first job: the pins still hold after every install, and every compiled package
# imports against the one torch. The builder has no GPU driver, and sgl_kernel (and TE) link libcuda.so.1:
# for this one check it resolves to the CUDA toolkit's stub library (its calls fail, loading works); the
# image itself keeps no stub on the library path (at run time the container runtime mounts the driver's).
RUN python3 /opt/check_versions.py && mkdir /tmp/cuda-stub \
    && ln -s /usr/local/cuda/lib64/stubs/libcuda.so /tmp/cuda-stub/libcuda.so.1 \
    && LD_LIBRARY_PATH=/tmp/cuda-stub:$LD_LIBRARY_PATH python3 -c "import torch, transformer_engine.pytorch, \
megatron.core, sglang, sgl_kernel, flashinfer, math_verify, tensorboard, modelopt.torch.quantization, megatron_rence; \
print('torch', torch.__version__, 'sglang', sglang.__version__)" \
    && rm -rf /tmp/cuda-stub

WORKDIR /opt/megatron-rence
