"""Every Python block in README.md runs as written: in order, in one namespace, offline, in a temporary directory.
Hub ids in the blocks are answered from a local Hugging Face cache holding tiny stand-ins of the same architectures
(tests/hub_stand_ins.py), so `load_pretrained("google/vit-base-patch16-224")` runs the real code path."""

import pathlib
import re

import pytest
from hub_stand_ins import STAND_INS

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_hub_ids_are_planted():
    named = re.findall(r"load_pretrained\(\s*\"([^\"]+)\"", "\n".join(python_blocks(README.read_text())))
    ids = {n for n in named if not n.endswith("/") and not n.startswith("runs/")}  # folders the blocks write
    assert ids <= set(STAND_INS), f"add a stand-in for {sorted(ids - set(STAND_INS))} to tests/hub_stand_ins.py"


def test_readme_python_blocks_run(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own README
        except Exception as e:
            pytest.fail(f"README python block {i} ({code.splitlines()[0]!r}) fails: {type(e).__name__}: {e}")
