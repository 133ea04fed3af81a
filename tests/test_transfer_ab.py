"""The A/B transferability experiment (Yosinski et al. 2014) as one sweep: models from scratch (`from_config`),
stages that run before the grid (`before`) and whose exports later points load (`{sweep_dir}`, `{axis.seed}`), the
`reinitialized` rule set (transferred units frozen), the frozen prefix cached, exports that carry their image
preprocessing. The real config (experiments/configs/sweeps/transfer_ab.py) runs at its tiny setting."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import tljax.models as tm
from tljax import job, rules, sweep, tree
from tljax.data import ImagePreprocess

# one worker runs this module under `pytest -n 2 --dist loadgroup`: its module fixtures (whole runs) are built once
pytestmark = pytest.mark.xdist_group("test_transfer_ab")

AB = "experiments/configs/sweeps/transfer_ab.py"
RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}


@pytest.fixture(scope="module")
def ab(tmp_path_factory, compilation_cache):
    workdir = tmp_path_factory.mktemp("ab")
    return sweep.run(sweep.load_config(f"{AB}:tiny"), workdir), workdir


def weights(folder: pathlib.Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_pretraining_runs_first_and_transfers_load_its_exports(ab):
    result, workdir = ab
    pre = workdir / "pretrain" / "runs"
    assert sorted(p.name for p in pre.iterdir()) == ["source=A,seed=0"]
    assert [o.point.name for o in result.outcomes] == ["transfer=AnB,n=2,seed=0", "transfer=AnB+,n=2,seed=0"]
    assert all(o.status == "completed" for o in result.outcomes)
    runs = workdir / "runs"
    config = json.loads((runs / "transfer=AnB,n=2,seed=0" / "config.json").read_text())
    assert config["model"]["name"] == str(pre / "source=A,seed=0" / "export")
    # a from-scratch export carries its preprocessing: the transfer runs resize to the same 16x16 with no warning
    processor = json.loads((pre / "source=A,seed=0" / "export" / "preprocessor_config.json").read_text())
    assert ImagePreprocess.from_hf_config(processor).size == 16


def test_anb_keeps_the_transferred_units_of_a_and_trains_the_rest(ab):
    _, workdir = ab
    source = weights(workdir / "pretrain" / "runs" / "source=A,seed=0" / "export")
    frozen = weights(workdir / "runs" / "transfer=AnB,n=2,seed=0" / "export")
    tuned = weights(workdir / "runs" / "transfer=AnB+,n=2,seed=0" / "export")
    stem = [k for k in source if k.startswith(("resnet.embedder.", "resnet.encoder.stages.0."))]
    top = [k for k in source if k.startswith("resnet.encoder.stages.3.") and k.endswith("weight")]
    assert stem and top
    for k in stem:  # the bottom 2 units: A's, bitwise (BatchNorm statistics too: inference mode)
        np.testing.assert_array_equal(frozen[k], source[k], err_msg=k)
    assert any(not np.array_equal(tuned[k], source[k]) for k in stem)  # AnB+ fine-tunes them
    assert all(not np.array_equal(frozen[k], source[k]) for k in top)  # re-initialised, then trained
    results = json.loads((workdir / "runs" / "transfer=AnB,n=2,seed=0" / "results.json").read_text())
    assert results["phases"][0]["prefix_cached_blocks"] == 1  # stage 0 frozen: the stem and it are cached
    plus = json.loads((workdir / "runs" / "transfer=AnB+,n=2,seed=0" / "results.json").read_text())
    assert plus["phases"][0]["prefix_cached_blocks"] == 0
    assert results["phases"][0]["trainable_params"] < plus["phases"][0]["trainable_params"]


def test_the_report_plots_accuracy_against_n(ab):
    result, workdir = ab
    assert [s.name for s in result.report.settings] == ["transfer=AnB,n=2", "transfer=AnB+,n=2"]
    assert (workdir / "plots" / "vs_n.png").read_bytes().startswith(b"\x89PNG")
    assert (workdir / "pretrain" / "summary.md").is_file()


def test_a_failed_stage_stops_the_sweep(tmp_path, monkeypatch):
    calls = []

    def failing(config, folder, **kwargs):
        calls.append(pathlib.Path(folder).name)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(job, "run", failing)
    with pytest.raises(sweep.RunFailed, match="stage 'pretrain'.*later stages need them"):
        sweep.run(sweep.load_config(f"{AB}:tiny"), tmp_path)
    assert calls == ["source=A,seed=0"] * 2  # retried once; nothing of the grid ran


def test_placeholders_need_their_context():
    point = sweep.Point("seed=1", {"seed": 1}, {}, "seed=1")
    assert sweep.expand(["{sweep_dir}/x/{axis.seed}", 3], point, "/w") == ["/w/x/1", 3]
    with pytest.raises(ValueError, match="no sweep directory"):
        sweep.expand("{sweep_dir}/x", point, None)
    with pytest.raises(ValueError, match="names axis 'lr'"):
        sweep.expand("{axis.lr}", point, "/w")
    assert sweep.expand("a photo of a {}.", point, None) == "a photo of a {}."  # other braces stay


def test_from_config_round_trips_through_save_and_load(tmp_path):
    loaded = tm.from_config(RESNET, num_classes=3, seed=1)
    assert loaded.report.loaded == [] and "params/head/out/kernel" in loaded.report.reinitialized
    again = tm.from_config(RESNET, num_classes=3, seed=1)
    same = jax.tree.map(np.array_equal, loaded.params, again.params)
    assert all(jax.tree.leaves(same))
    tm.save_pretrained(tmp_path / "m", loaded)
    back = tm.load_pretrained(tmp_path / "m")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    logits = lambda m: jax.jit(lambda v, x: m.model.apply(v, pixel_values=x)["logits"])(m.variables, x)
    np.testing.assert_allclose(logits(back), logits(loaded), atol=1e-6)
    with pytest.raises(ValueError, match="nothing would train|would train nothing"):
        rules.reinitialized(back)
    fresh_top = tm.load_pretrained(tmp_path / "m", reinit=[r"^backbone/stage_1/"])
    trainable = [rx for rx, rule in rules.reinitialized(fresh_top) if rx != ".*"]
    assert trainable and all("stage_1" in rx for rx in trainable)
    assert tree.count(back.params) == tree.count(loaded.params)


def test_from_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="needs 'model_type'"):
        tm.from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        tm.from_config({"model_type": "gpt2"})
