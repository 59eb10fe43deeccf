"""TEST-ONLY shim: SGLang's own norm classes (their forward_native runs on CPU)."""


def __getattr__(name):
    if name in ("RMSNorm", "GemmaRMSNorm"):
        from sglang.srt.layers import layernorm

        return getattr(layernorm, name)
    raise AttributeError(name)
