"""The container the Slurm scripts run in: an nvcr.io PyTorch base and every pip package at an exact version.

The image cannot be built here (no Docker engine, no GPU); this checks the Dockerfile as text.
"""
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
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
            if command[:2] == ["pip", "install"] or command[:4] == ["python", "-m", "pip", "install"]:
                out.append(command[command.index("install") + 1:])
            command = []
    return out


def requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_base_image_is_an_ngc_pytorch_tag():
    froms = [i for i in instructions(DOCKERFILE.read_text()) if i.startswith("FROM ")]
    assert len(froms) == 1
    assert re.fullmatch(r"FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", froms[0]), froms[0]


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
    for needed in ("sglang", "megatron-core", "math-verify", "sgl-kernel", "transformers"):
        assert needed in names, needed


def test_the_pin_check_can_fail():
    bad = "FROM nvcr.io/nvidia/pytorch:25.06-py3\nRUN pip install sglang megatron-core==0.16.1\n"
    (args,) = pip_installs(bad)
    assert [a for a in args if not PIN.match(a)] == ["sglang"]


def test_project_installed_without_dependencies_after_its_pins():
    installs = pip_installs(DOCKERFILE.read_text())
    project = [args for args in installs if "-e" in args]
    assert project == [["--no-deps", "-e", "/opt/megatron-rence"]]
    assert ["--no-deps", "sglang==0.5.5.post3"] in installs  # SGLang's torch pin must not replace NGC's torch
