# megatron-rence on SGLang's own release image (as slime does): SGLang 0.5.5.post3 with the torch 2.8.0,
# sgl-kernel 0.3.17.post1, flashinfer and transformers its release was built and tested with, CUDA 12.9,
# Python 3.12. This adds Transformer Engine, COMPILED HERE against that torch, megatron-core, math-verify
# and the project, every version pinned (docker/README.md says why this base and not an NGC PyTorch one).
#
#   docker build -t <registry>/megatron-rence:0.1.0 .
#   docker push <registry>/megatron-rence:0.1.0
#   enroot import -o megatron-rence.sqsh docker://<registry>#megatron-rence:0.1.0     (docker/README.md)
#
# Not built in this repository's CI (no Docker engine, no GPU there); tests/unit/test_slurm_container.py checks
# the base tag against the SGLang pin, that every pip package is pinned and that the import check is there.
FROM lmsysorg/sglang:v0.5.5.post3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

# 1. Fail at once if the base is not the release we pin: every compiled package below is built against
#    this torch, and sgl-kernel's wheel was built against the released torch 2.8.0 (NGC's 2.8.0a0 builds
#    do not export the same symbols: undefined-symbol failures at import).
RUN python3 -c "import importlib.metadata as m, torch; \
v = {p: m.version(p) for p in ('sglang', 'sgl-kernel', 'torch', 'transformers', 'flashinfer-python')}; print(v); \
assert v['sglang'] == '0.5.5.post3' and v['sgl-kernel'] == '0.3.17.post1', v; \
assert v['torch'].split('+')[0] == '2.8.0' and v['transformers'] == '4.57.1', v"

# 2. Transformer Engine: the core library as a binary wheel, the PyTorch extension compiled from its sdist
#    against the image's torch (--no-build-isolation), for Ampere and Hopper. megatron-core 0.16.1 asks
#    for TE >= 2.9 (< 2.12); TE's FusedAdam replaces apex's, so apex is not needed.
RUN python3 -m pip install pybind11==3.0.1 ninja==1.13.0
RUN NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="80;90" MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation transformer-engine[core_cu12,pytorch]==2.9.0

# 3. The trainer side: megatron-core (the version CI tests on CPU), the verifier, and NVIDIA Model Optimizer for
#    the quantized export (tools/export_megatron_to_hf.py --quant; 0.46.1 is the newest that imports with
#    megatron-core 0.16.1; its core needs torch >= 2.8 and no transformers pin).
RUN python3 -m pip install megatron-core==0.16.1 "math-verify[antlr4_13_2]==0.9.0" nvidia-modelopt==0.46.1

# 4. The project (editable, so a checkout mounted over /opt/megatron-rence runs as is); its dependencies
#    are all installed above or by the image.
#    Only what the package and the launches need: no .venv, runs/ or caches from a developer checkout.
COPY setup.py /opt/megatron-rence/setup.py
COPY megatron_rence /opt/megatron-rence/megatron_rence
COPY recipes /opt/megatron-rence/recipes
COPY slurm /opt/megatron-rence/slurm
RUN python3 -m pip install --no-deps -e /opt/megatron-rence

# Fail the build, not the first job, when an import is broken: TE's extension and sgl-kernel's ops both
# load against the one torch in the image.
RUN python3 -c "import torch, transformer_engine.pytorch, megatron.core, sglang, sgl_kernel, flashinfer, \
math_verify, modelopt.torch.quantization, megatron_rence; print('torch', torch.__version__, 'sglang', sglang.__version__)"

WORKDIR /opt/megatron-rence
