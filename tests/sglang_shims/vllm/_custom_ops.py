"""TEST-ONLY shim: SGLang's rotary embedding imports `rotary_embedding` and stores it; on CPU it is never
called (it runs forward_native). Calling it raises; no other name exists."""


def rotary_embedding(*args, **kwargs):
    raise RuntimeError("vllm._custom_ops.rotary_embedding was called, but vllm here is a test-only import shim "
                       "(tests/sglang_shims): SGLang must take its native-torch CPU path")
