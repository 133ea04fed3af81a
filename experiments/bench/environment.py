"""Checks, in seconds, that this Python can run the accelerator benchmarks, before a lent GPU's minutes go to them.

    python -m experiments.bench.environment       # prints the versions; exit 2 naming what is missing

A GPU image that has jax, flax, torch and transformers but not, say, grain would otherwise fail each benchmark in
turn after building its checkpoints. Versions that differ from requirements.txt are printed, not refused: a GPU
host's jax is the one built for its CUDA.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"
# distribution -> the module the benchmarks import from it (tljax's step pulls in its data layer: grain, PIL)
NEEDED = {
    "jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax", "orbax-checkpoint": "orbax.checkpoint",
    "grain": "grain", "ml-collections": "ml_collections", "pillow": "PIL", "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub", "tokenizers": "tokenizers", "transformers": "transformers",
    "torch": "torch",
}  # fmt: skip
# what the benchmark processes import: a missing module not listed above still shows here
ENTRY_POINTS = ("tljax.engine", "experiments.bench.peer", "experiments.bench.mfu", "experiments.bench.memory")


def pins(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{distribution: version} of the `name==version` lines of requirements.txt (torch's pin is the test file's)."""
    found = {}
    for file in (path, path.with_name("requirements-test.txt")):
        for line in file.read_text().splitlines():
            if m := re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+).*", line):
                found[m[1].lower()] = m[2]
    return found


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(needed: dict[str, str] = NEEDED, entry_points=ENTRY_POINTS) -> list[str]:
    """The modules that do not import: those of `needed`, then the first one each entry point lacks."""
    gone = []
    for module in [*needed.values(), *entry_points]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name not in gone:
                gone.append(e.name)
    return gone


def report(gone: list[str], pinned: dict[str, str], needed: dict[str, str] = NEEDED) -> str:
    """The error for missing modules: each with the pinned distribution that provides it."""
    by_module = {module.split(".")[0]: dist for dist, module in needed.items()}
    wanted = []
    for module in gone:
        dist = by_module.get(module.split(".")[0])
        wanted.append(f"{dist}=={pinned[dist.lower()]}" if dist and dist.lower() in pinned else module)
    return (
        f"missing Python modules: {', '.join(gone)}. Install them with `python3 -m pip install {' '.join(wanted)}`; "
        f"on a machine without network, `pip download` their wheels (and those of their own dependencies) elsewhere "
        f"and install them there with `pip install --no-index`"
    )


def main() -> int:
    pinned = pins()
    found = {dist: version(dist) for dist in NEEDED}
    print("# " + ", ".join(f"{d} {v or 'MISSING'}" for d, v in found.items()), file=sys.stderr)
    differ = [f"{d} {v} (pinned {pinned[d.lower()]})" for d, v in found.items()
              if v and d.lower() in pinned and v.split("+")[0] != pinned[d.lower()]]  # fmt: skip
    if differ:
        print("# versions other than requirements.txt's: " + ", ".join(differ), file=sys.stderr)
    gone = missing()
    if gone:
        print("# " + report(gone, pinned), file=sys.stderr)
        return 2
    import jax

    print(f"# devices: {jax.devices()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
