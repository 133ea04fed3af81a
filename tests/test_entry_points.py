"""The README's main job, the benchmark's quick mode and the notebooks run end to end."""

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


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    namespace = {}
    exec(compile(code, str(notebook), "exec"), namespace)  # noqa: S102 - our own notebook
    assert float(namespace["metrics"]["loss"]) < 0.69


def test_bench_fsdp_quick_shards_the_state(capsys):
    import jax

    from experiments import bench

    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    bench.main(["fsdp", "--quick"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    ratio = next(r for r in rows if r["metric"] == "fsdp_over_data_device_bytes")
    assert ratio["value"] == pytest.approx(1 / 8, rel=0.05)
