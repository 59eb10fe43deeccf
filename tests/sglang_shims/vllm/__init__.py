"""TEST-ONLY import shim for `vllm`, just the names SGLang 0.5.5.post3 imports on a CPU without AMX.

See tests/sglang_shims/README.md: the layer classes are SGLang's own; nothing else of vllm exists here.
"""
SHIM = True
__version__ = "0.0.0+sglang-test-shim"
