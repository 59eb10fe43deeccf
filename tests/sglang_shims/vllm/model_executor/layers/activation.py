"""TEST-ONLY shim: SGLang's own activation classes (their forward_native runs on CPU)."""


def __getattr__(name):
    if name in ("SiluAndMul", "GeluAndMul"):
        from sglang.srt.layers import activation

        return getattr(activation, name)
    raise AttributeError(name)
