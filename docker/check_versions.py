"""Build-time check of the image (Dockerfile): the packages whose versions must match each other are the ones
pinned. Reads installed metadata only (no import of torch, no GPU driver needed); exits 1 naming each mismatch.
"""
import importlib.metadata as metadata
import sys

EXPECTED = {
    "torch": "2.8.0",  # the released build (PyPI), which sgl-kernel 0.3.17.post1 is compiled against
    "sglang": "0.5.5.post3",  # megatron_rence/rollout/sglang_engine.py was written against it
    "sgl-kernel": "0.3.17.post1",  # SGLang 0.5.5.post3's pin
    "transformers": "4.57.1",  # SGLang 0.5.5.post3's pin; the project's code must run with it
}


def main() -> int:
    bad = []
    for package, want in EXPECTED.items():
        try:
            have = metadata.version(package)
        except metadata.PackageNotFoundError:
            bad.append(f"{package}: not installed (want {want})")
            continue
        if have.split("+")[0] != want:  # torch's local version (+cu128) is not part of the pin
            bad.append(f"{package}: {have} installed, want {want}")
    for line in bad:
        print(f"check_versions: {line}", file=sys.stderr)
    if not bad:
        print("check_versions: " + ", ".join(f"{p} {v}" for p, v in EXPECTED.items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
