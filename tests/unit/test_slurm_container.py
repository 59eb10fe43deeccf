"""The container the Slurm scripts run in: NGC's CUDA deep-learning base (CUDA 12.9, no torch), the released
torch 2.8.0 and the pinned SGLang from PyPI (sgl-kernel matches that torch by construction), Transformer
Engine compiled against that torch, every pip package at an exact version, the versions checked before the
compilation and at the end, every compiled package imported at build time without a GPU driver.

The image cannot be built here (no Docker engine, no GPU); this checks the Dockerfile as text.
"""
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
SGLANG = "0.5.5.post3"  # the pin the adapter was written against (rollout/sglang_engine.py)
PIN = re.compile(r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?==[A-Za-z0-9_.+\-]+$")


def instructions(text: str) -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions."""
    out = []
    for inst in instructions(text):
        if not inst.startswith("RUN "):
            continue
        lexer = shlex.shlex(inst[4:], posix=True, punctuation_chars="&;|")
        lexer.wordchars += "=[]-.,/:+@"
        command: list[str] = []
        for token in list(lexer) + [";"]:
            if token not in ("&&", ";", "||", "|"):
                command.append(token)
                continue
            while command and re.match(r"^[A-Z_][A-Z0-9_]*=", command[0]):  # VAR=value before the command
                command.pop(0)
            if command[:2] == ["pip", "install"] or command[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]) \
                    and command[3:4] == ["install"]:
                out.append(command[command.index("install") + 1:])
            command = []
    return out


def requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_base_image_is_ngc_cuda_dl_base_without_torch():
    froms = [i for i in instructions(DOCKERFILE.read_text()) if i.startswith("FROM ")]
    assert len(froms) == 1 and re.fullmatch(r"FROM nvcr\.io/nvidia/cuda-dl-base:25\.\d\d-cuda12\.9-devel-ubuntu24\.04",
                                             froms[0]), froms
    assert f"SGLang {SGLANG}" in (REPO / "megatron_rence" / "rollout" / "sglang_engine.py").read_text()
    readme = (REPO / "docker" / "README.md").read_text()
    assert froms[0].split()[1] in readme and "Why this base" in readme


def test_torch_and_sglang_come_from_pypi_at_the_release_pins():
    installs = [a for args in pip_installs(DOCKERFILE.read_text()) for a in args]
    for pin in ("torch==2.8.0", f"sglang=={SGLANG}", "sgl-kernel==0.3.17.post1", "transformers==4.57.1"):
        assert pin in installs, pin
    assert not any("index-url" in a for a in installs)  # PyPI's released builds, not a nightly / NGC index


def test_versions_checked_before_the_build_and_at_the_end_and_imports_need_no_driver():
    sys_path = REPO / "docker" / "check_versions.py"
    text = sys_path.read_text()
    for pin in ('"torch": "2.8.0"', f'"sglang": "{SGLANG}"', '"sgl-kernel": "0.3.17.post1"',
                '"transformers": "4.57.1"'):
        assert pin in text, pin
    runs = [i for i in instructions(DOCKERFILE.read_text()) if i.startswith("RUN ")]
    checks = [i for i, r in enumerate(runs) if "check_versions.py" in r]
    te = next(i for i, r in enumerate(runs) if "transformer-engine" in r)
    assert len(checks) == 2 and checks[0] < te and checks[1] == len(runs) - 1
    imports = runs[-1]
    for module in ("transformer_engine.pytorch", "sgl_kernel", "sglang", "megatron.core", "megatron_rence",
                   "tensorboard"):
        assert module in imports, module
    # sgl_kernel links libcuda.so.1: the builder has no driver, so the check loads the toolkit's stub, only there
    assert "stubs/libcuda.so" in imports and "LD_LIBRARY_PATH=/tmp/cuda-stub" in imports
    assert "rm -rf /tmp/cuda-stub" in imports
    env = " ".join(i for i in instructions(DOCKERFILE.read_text()) if i.startswith("ENV "))
    assert "stub" not in env


def test_check_versions_fails_on_a_mismatch(monkeypatch):
    import importlib.util
    import importlib.metadata as md

    spec = importlib.util.spec_from_file_location("check_versions", REPO / "docker" / "check_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    versions = {"torch": "2.8.0+cu128", "sglang": SGLANG, "sgl-kernel": "0.3.17.post1", "transformers": "4.57.1"}
    monkeypatch.setattr(md, "version", lambda p: versions[p])
    assert module.main() == 0
    versions["torch"] = "2.8.0a0+5228986c39"  # NGC PyTorch's build
    assert module.main() == 1


def test_every_pip_package_is_pinned():
    installs = pip_installs(DOCKERFILE.read_text())
    assert installs, "no pip install in the Dockerfile"
    packages = []
    for args in installs:
        it = iter(args)
        for arg in it:
            if arg == "-r":
                req = next(it)
                copied = [i.split()[1] for i in instructions(DOCKERFILE.read_text())
                          if i.startswith("COPY ") and i.split()[2] == req]
                assert copied, f"{req} is not copied into the image"
                packages += requirements(REPO / copied[0])
            elif arg == "-e":
                assert next(it) == "/opt/megatron-rence"  # the project itself
            elif not arg.startswith("-"):
                packages.append(arg)
    assert packages
    unpinned = [p for p in packages if not PIN.match(p)]
    assert not unpinned, f"pip packages without an exact version: {unpinned}"
    names = {re.split(r"[\[=]", p)[0].lower().replace("_", "-") for p in packages}
    for needed in ("transformer-engine", "megatron-core", "math-verify", "tensorboard", "torch", "sglang"):
        assert needed in names, needed


def test_the_pin_check_can_fail():
    bad = "FROM ubuntu:24.04\nRUN python3 -m pip install sglang megatron-core==0.16.1\n"
    (args,) = pip_installs(bad)
    assert [a for a in args if not PIN.match(a)] == ["sglang"]


def test_project_installed_without_dependencies_and_te_built_against_the_image_torch():
    installs = pip_installs(DOCKERFILE.read_text())
    project = [args for args in installs if "-e" in args]
    assert project == [["--no-deps", "-e", "/opt/megatron-rence"]]
    assert ["--no-build-isolation", "transformer-engine[core_cu12,pytorch]==2.9.0"] in installs
