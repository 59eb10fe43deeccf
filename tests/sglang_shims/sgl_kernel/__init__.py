"""TEST-ONLY import shim for `sgl_kernel` (CUDA-only on PyPI): every name imports, calling anything raises.

See tests/sglang_shims/README.md. Submodules (`sgl_kernel.kvcacheio`, `sgl_kernel.scalar_type`, ...) are
created on import by a finder installed here, so `from sgl_kernel.x.y import z` works too.
"""
import importlib.abc
import importlib.machinery
import sys
import types

SHIM = True  # lets a test check that this, not a real sgl_kernel, was imported


class Unavailable:
    """A stand-in for any sgl_kernel object: attributes chain, calling raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} was called, but sgl_kernel here is a test-only import shim "
                           "(tests/sglang_shims): SGLang must take its native-torch CPU path")

    def __repr__(self):
        return f"<sgl_kernel shim {self._name}>"


def _module_getattr(module_name: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unavailable(f"{module_name}.{attr}")
    return __getattr__


__getattr__ = _module_getattr("sgl_kernel")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
