"""The container the Slurm scripts run in: SGLang's release image of the pinned SGLang version (its torch is
the one sgl-kernel was built against), Transformer Engine compiled against that torch, every pip package
at an exact version, the versions of the base checked and every compiled package imported at build time.

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


def test_base_image_is_sglangs_release_image_of_the_pinned_version():
    froms = [i for i in instructions(DOCKERFILE.read_text()) if i.startswith("FROM ")]
    assert froms == [f"FROM lmsysorg/sglang:v{SGLANG}"]
    assert f"SGLang {SGLANG}" in (REPO / "megatron_rence" / "rollout" / "sglang_engine.py").read_text()
    assert f"lmsysorg/sglang:v{SGLANG}" in (REPO / "docker" / "README.md").read_text()


def test_base_versions_are_checked_and_compiled_packages_imported():
    runs = [i for i in instructions(DOCKERFILE.read_text()) if i.startswith("RUN ")]
    check = next(r for r in runs if "importlib.metadata" in r)
    for expected in (f"v['sglang'] == '{SGLANG}'", "v['sgl-kernel'] == '0.3.17.post1'", "== '2.8.0'",
                     "v['transformers'] == '4.57.1'"):
        assert expected in check, expected
    assert runs.index(check) < min(i for i, r in enumerate(runs) if "pip install" in r)  # before anything is built
    imports = runs[-1]
    for module in ("transformer_engine.pytorch", "sgl_kernel", "sglang", "megatron.core", "megatron_rence"):
        assert module in imports, module
    # after every install, transformers is still SGLang's pin (5.x would silently change the RoPE base)
    assert "transformers.__version__ == '4.57.1'" in imports


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
    for needed in ("transformer-engine", "megatron-core", "math-verify"):
        assert needed in names, needed
    assert not {"torch", "sglang", "sgl-kernel"} & names  # the base image's: reinstalling them breaks the ABI match


def test_the_pin_check_can_fail():
    bad = "FROM lmsysorg/sglang:v0.5.5.post3\nRUN python3 -m pip install sglang megatron-core==0.16.1\n"
    (args,) = pip_installs(bad)
    assert [a for a in args if not PIN.match(a)] == ["sglang"]


def test_project_installed_without_dependencies_and_te_built_against_the_image_torch():
    installs = pip_installs(DOCKERFILE.read_text())
    project = [args for args in installs if "-e" in args]
    assert project == [["--no-deps", "-e", "/opt/megatron-rence"]]
    assert ["--no-build-isolation", "transformer-engine[core_cu12,pytorch]==2.9.0"] in installs
