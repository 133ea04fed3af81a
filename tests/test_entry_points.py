"""The README's main job, the benchmark's quick mode and the notebooks run end to end."""

import ast
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_finds_paraphrases_and_matches_torch(capsys):
    from experiments import demo

    assert demo.main(["--check-torch"]) == 0
    out = capsys.readouterr().out
    assert "paraphrase pairs found: True" in out and "trainable 22,714,756 of 22,714,756" in out


def test_bench_freeze_quick_prints_json_lines(capsys):
    from experiments import bench

    bench.main(["freeze", "--quick"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    metrics = {(r["name"], r["metric"]): r["value"] for r in rows}
    assert metrics[("freeze/full", "opt_state_over_trainable_bytes")] == 2.0
    assert metrics[("freeze/head_only", "opt_state_over_trainable_bytes")] == 2.0
    assert ("freeze/head_only", "head_only_over_forward") in metrics
    flops = {r["name"]: r["flops"] for r in rows if r["metric"] == "step_ms"}
    assert flops["freeze/head_only"] < 1.15 * flops["freeze/forward"] < flops["freeze/full"]


def test_bench_schedule_quick_reports_every_phase(capsys):
    from experiments import bench

    bench.main(["schedule", "--quick"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    phases = [r for r in rows if r["metric"] == "step_ms"]
    assert [r["name"].rsplit("/", 1)[1] for r in phases] == ["head", "top_1", "top_2", "top_3", "top_4", "all"]
    counts = [r["trainable_params"] for r in phases]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert all(r["compile_s"] > 0 and r["compile_s_cached"] > 0 for r in phases)
    assert {r["metric"] for r in rows} >= {"last_over_first_step", "compile_cached_over_cold"}


def _outputs(cell) -> str:
    """The text a code cell printed or displayed (streams, plain text and markdown)."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "".join(parts)


def _quickstart_trained(cells) -> bool:
    """The probe's raw steps end below chance loss (ln 2) on their 4 sentences; LP-FT's evaluation is printed (the
    notebook itself asserts accuracy above 3x chance)."""
    steps = next(c for c in cells if "make_train_step(" in c.source)
    final = ast.literal_eval(_outputs(steps).strip().splitlines()[-1])
    return final["loss"] < 0.69 and "finetune   validation accuracy" in "".join(map(_outputs, cells))


def _ablation_reported(cells) -> bool:
    """The summary table with both schedules of the tiny sweep, and its plots shown as images."""
    text = "".join(map(_outputs, cells))
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    table = "| schedule | test_accuracy (mean ± std)" in text
    return table and "linear_probe" in text and "full" in text and len(images) >= 3


NOTEBOOK_CHECKS = {"quickstart.ipynb": _quickstart_trained, "freezing_ablation.ipynb": _ablation_reported}


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs(notebook, tmp_path, monkeypatch, planted_hub):
    """Each notebook runs top to bottom in a Jupyter kernel (nbclient): any failing cell fails the test. The kernel
    sees one CPU device (as a notebook user would), the sweep notebook the 2-block stand-in BERT."""
    import nbclient
    import nbformat

    monkeypatch.setenv("TLJAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv(
        "TLJAX_NOTEBOOK_MODEL", str(next((planted_hub / "models--bert-base-uncased" / "snapshots").iterdir()))
    )
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in cells)
    assert NOTEBOOK_CHECKS[notebook.name](cells), notebook.name


def test_bench_fsdp_quick_shards_the_state(capsys):
    import jax

    from experiments import bench

    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    bench.main(["fsdp", "--quick"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    ratio = next(r for r in rows if r["metric"] == "fsdp_over_data_device_bytes")
    assert ratio["value"] == pytest.approx(1 / 8, rel=0.05)


def test_every_entry_point_imports_into_one_process_and_parses_its_flags():
    """Entry points define their absl flags only when run: importing finetune, adapt, multitask and fewshot into one
    process used to fail (`--config` defined twice), which broke any test or notebook that used two of them."""
    import importlib
    import subprocess
    import sys

    names = ("finetune", "adapt", "multitask", "fewshot", "sweep", "predict", "transferability")
    for name in names:
        importlib.import_module(f"experiments.{name}")
    for name in ("finetune", "adapt", "multitask", "fewshot"):
        out = subprocess.run(
            [sys.executable, "-m", f"experiments.{name}", "--helpshort"], cwd=ROOT, capture_output=True, text=True
        ).stdout  # fmt: skip (absl's help exits with 1)
        assert "--config" in out and "--workdir" in out and "--compilation_cache" in out, name
        assert "--cpu_devices" in out, name
        assert ("--seeds" in out) == (name in ("adapt", "multitask")), name
    bad = subprocess.run([sys.executable, "-m", "experiments.finetune", "--cpu_devices=two"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0
    assert "--cpu_devices: CPU device count: expected a positive integer or 'auto', got 'two'" in bad.stderr
    for name in ("finetune", "adapt", "multitask", "fewshot"):  # regression: a bare AttributeError from ml_collections
        typo = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--config.bogus_key=1"], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        assert typo.returncode == 1 and "--config.bogus_key: the config has no key 'bogus_key'" in typo.stderr, name
