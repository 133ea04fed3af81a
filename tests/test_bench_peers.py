"""`bench peer / mfu / memory / scaling`: the --quick entry points print finite, self-consistent JSON lines; the
PyTorch side freezes exactly what tljax's rule sets freeze; the batch search finds the boundary."""

import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

from experiments.bench import common, environment, memory, peer, profile, torch_side


def _bench(*args) -> dict:
    """Runs `python -m experiments.bench ARGS` and returns {(name, metric): row}."""
    out = subprocess.run([sys.executable, "-m", "experiments.bench", *args], check=True, capture_output=True,
                         text=True)  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows and all(isinstance(r["value"], int | float) and math.isfinite(r["value"]) for r in rows)
    return {(r["name"], r["metric"]): r for r in rows}


def test_peer_quick_reports_both_sides_and_their_ratio():
    rows = _bench("peer", "--quick", "--models", "tiny-bert", "--rounds", "1", "--reps", "2")
    for model in ("tiny-bert",):  # tiny-vit's worker: the same code (its freezing is checked below)
        for mode, metric in peer.RATIO_METRIC.items():
            at = lambda m, where=f"peer/{model}/{mode}": rows[(where, m)]
            jax_s, torch_s = at("tljax_examples_per_s"), at("torch_examples_per_s")
            assert at(metric)["value"] == pytest.approx(jax_s["value"] / torch_s["value"])
            assert jax_s["value"] == pytest.approx(8 / (at("tljax_step_ms")["value"] / 1e3))
            assert at("torch_step_ms")["p25"] <= at("torch_step_ms")["value"] <= at("torch_step_ms")["p75"]
            assert at(metric)["threads"] == "1" and at(metric)["torch_threads"] == 1
            assert "intra_op_parallelism_threads=1" in at(metric)["xla_flags"]  # the flags the tljax worker ran with
    # each side's product of the model's fc1 shape (batch x seq, hidden) @ (hidden, intermediate), same rounds
    gemm = lambda m: rows[("peer/tiny-bert/gemm", m)]
    assert gemm("tljax_gemm_gflops")["shape"] == "256x64x256" and gemm("torch_gemm_gflops")["value"] > 0
    ratio = gemm("tljax_gemm_gflops")["value"] / gemm("torch_gemm_gflops")["value"]
    assert gemm("gemm_over_torch")["value"] == pytest.approx(ratio)
    assert gemm("gemm_over_torch")["host_cpu"] == common.host_cpu()  # the same command, other ratios on other CPUs


def test_host_cpu_names_the_model_and_the_widest_vector_extensions():
    zen5 = "processor\t: 0\nmodel name\t: AMD EPYC 9R45\nflags\t\t: fpu avx avx2 avx512f avx512_bf16\n\n"
    xeon = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert common.host_cpu(zen5) == "AMD EPYC 9R45 (avx512, avx512_bf16)"
    assert common.host_cpu(xeon) == "Intel(R) Xeon(R) Platinum 8481C (avx512, avx512_bf16, amx)"
    assert common.host_cpu("model name\t: EPYC 7B12\nflags\t: sse avx avx2 fma\n") == "EPYC 7B12 (avx2)"
    assert common.host_cpu("flags\t: fp asimd\n")  # no model name (ARM): the platform's processor name


def test_repeated_gemm_runs_for_about_its_seconds_and_counts_every_call(monkeypatch):
    import time

    clock, calls, finished = [0.0], [], []
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    once = lambda: calls.append(1) or clock.__setitem__(0, clock[0] + 0.01)  # each product takes 10 ms
    run, flops = peer.repeated(once, finished.append, 1000, seconds=0.1)
    assert len(calls) == 3 and len(finished) == 3  # warm-up twice, calibration once
    run()
    assert len(calls) == 3 + 10 and flops == 1000 * 10 and len(finished) == 4  # one finish per timed call


def test_mfu_quick_is_xla_flops_over_time_over_peak():
    rows = _bench("mfu", "--quick", "--batch", "4")  # the model's batch is 8: --batch sets another (a GPU's larger)
    at = lambda m: rows[("mfu/tiny-bert/full", m)]["value"]
    peak = rows[("mfu/peak", "peak_flops_per_s")]["value"]
    assert rows[("mfu/peak", "peak_flops_per_s")]["host_cpu"] == common.host_cpu()
    assert at("mfu") == pytest.approx(at("xla_flops_per_step") / (at("step_ms") / 1e3) / peak)
    best = rows[("mfu/peak", "best_peak_flops_per_s")]["value"]
    assert best >= peak and at("mfu_best_peak") == pytest.approx(at("mfu") * peak / best)
    paired = rows[("mfu/tiny-bert/full", "mfu_paired")]
    assert len(paired["rounds"]) == 2 and paired["value"] == pytest.approx(sum(paired["rounds"]) / 2, abs=1e-3)
    assert all(0 < m for m in paired["rounds"])
    assert at("xla_over_6nt") == pytest.approx(at("xla_flops_per_step") / at("six_n_tokens_flops"))
    # a transformer step is ~6NT multiply-adds plus attention scores and elementwise work: not 3x off either way
    assert 0.9 < at("xla_over_6nt_plus_attention") <= at("xla_over_6nt") < 2.0
    assert at("xla_flops_with_dropout") > at("xla_flops_per_step")  # the mask hash's integer ops: not model FLOPs
    # tiny-bert: 4 layers of 4*64*64 + 4*64 (attention) + 2*64*256 + 256 + 64 (MLP) + 4*64 (norms), pooler, head
    layer = 4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 4 * 64
    n = 4 * layer + 2 * 64 + (64 * 64 + 64) + (64 * 4 + 4)  # + embedding norm, pooler, head
    assert rows[("mfu/tiny-bert/full", "six_n_tokens_flops")]["non_embedding_params"] == n
    assert at("six_n_tokens_flops") == 6 * n * 4 * 32 and rows[("mfu/tiny-bert/full", "mfu")]["batch"] == 4
    from experiments.bench import mfu

    with pytest.raises(ValueError, match="--batch 3: a positive count divisible by --jax_devices 2"):
        mfu.run(True, jax_devices=2, batch_size=3)


def test_mfu_peak_product_runs_bf16_on_the_bf16_kernels():
    """The bf16 peak was timed on a product with a bf16 result, which XLA:CPU widens to float32 (311 GFLOP/s against
    its bf16 kernels' 630-850 on this repo's CPU), so a bf16 step's MFU read 0.78 against a peak it exceeded."""
    import jax.numpy as jnp

    from experiments.bench import mfu

    a = jnp.ones((64, 64), jnp.bfloat16)
    assert mfu.product(a, a).dtype == jnp.float32
    assert "convert" not in mfu.product.lower(a, a).compile().as_text()  # bf16 operands straight into the product


def test_memory_quick_orders_the_modes():
    rows = _bench("memory", "--quick")
    at = lambda mode, m: rows[(f"memory/{mode}", m)]["value"]
    assert at("head", "opt_state_mb") < at("top3", "opt_state_mb") < at("full", "opt_state_mb")
    assert at("head", "train_mb") < at("full", "train_mb")
    assert at("full", "largest_batch") <= at("top3", "largest_batch") <= at("head", "largest_batch")
    assert at("full", "largest_batch") >= 1
    assert rows[("memory/head", "train_mb_over_full")]["value"] < 1


def test_scaling_quick_covers_every_count_and_says_fake_devices_show_overhead():
    rows = _bench("scaling", "--quick", "--devices", "1,8")
    for n in (1, 8):
        for mode in ("data", "fsdp"):
            row = rows[(f"scaling/{mode}/{n}", "examples_per_s")]
            assert row["value"] == pytest.approx(8 / (row["step_ms"] / 1e3))
            assert "overhead, not speed-up" in row["note"]
    assert rows[("scaling/data/1", "speedup_over_1")]["value"] == 1.0


@pytest.mark.parametrize("model", peer.QUICK_MODELS)
def test_torch_side_trains_what_tljax_rules_train(model, tmp_path):
    import transformers

    s = peer.checkpoints([model], str(tmp_path))[model]
    loaded = peer.jax_load(s)
    batch = peer.make_batch(s, 2)
    cls = transformers.BertForSequenceClassification if s["kind"] == "text" else transformers.ViTForImageClassification
    hf = cls.from_pretrained(s["folder"])
    for mode in peer.MODES:
        ours = peer.jax_partition(loaded, mode, batch).count(True)
        theirs = sum(p.numel() for n, p in hf.named_parameters() if torch_side.trainable(n, mode, s["layers"]))
        assert theirs == ours, mode
    assert peer.jax_partition(loaded, "head", batch).count(True) == 64 * 4 + 4


def test_bf16_precision_runs_the_accelerator_path_on_cpu():
    """--precision bf16 on a CPU takes the code path a GPU takes by default (tljax bf16 compute, torch autocast),
    so the one run a lent GPU gets is not the first time that path runs."""
    rows = _bench("peer", "--quick", "--models", "tiny-bert", "--modes", "head", "--rounds", "1", "--reps", "1",
                  "--precision", "bf16")  # fmt: skip
    row = rows[("peer/tiny-bert/head", "head_over_torch")]
    assert (row["precision"], row["torch_precision"]) == ("bf16 compute, fp32 params", "bf16 autocast")
    assert peer.bf16({"precision": "auto"}, "gpu") and not peer.bf16({"precision": "auto"}, "cpu")
    assert not peer.bf16({"precision": "fp32"}, "gpu") and peer.bf16({}, "tpu")
    with pytest.raises(ValueError, match="--precision 'fp16': choose one of"):
        peer.checkpoints(["tiny-bert"], "unused", "fp16")


def test_fused_attention_runs_both_sides_without_attention_dropout(tmp_path):
    """--attention fused (cuDNN's kernel on a GPU) has no attention dropout, so PyTorch's side trains without it too."""
    rows = _bench("peer", "--quick", "--models", "tiny-bert", "--modes", "head", "--rounds", "1", "--reps", "1",
                  "--attention", "fused")  # fmt: skip
    assert rows[("peer/tiny-bert/head", "head_over_torch")]["attention"] == "fused"
    eager, fused = (
        peer.checkpoints(["tiny-bert"], str(tmp_path / a), attention=a)["tiny-bert"] for a in peer.ATTENTION
    )
    tljax_side = peer.jax_load(fused).model.backbone
    assert (tljax_side.attention, tljax_side.attention_dropout) == ("fused", 0.0)
    assert torch_side.load_model(fused).config.attention_probs_dropout_prob == 0.0
    assert torch_side.load_model(eager).config.attention_probs_dropout_prob == 0.1  # BertConfig's, both sides
    assert peer.jax_load(eager).model.backbone.attention_dropout == 0.1
    with pytest.raises(ValueError, match="--attention 'flash': choose one of"):
        peer.checkpoints(["tiny-bert"], str(tmp_path), attention="flash")


def _fake_python(tmp_path, env_rc: int = 0) -> dict:
    """The environment for accelerator.sh with `python3` a stand-in: the environment check exits `env_rc`, `peer`
    fails, every other benchmark prints one row."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\n[ "$2" = experiments.bench.environment ] && exit {env_rc}\n[ "$3" = peer ] && exit 3\n'
                    'echo \'{"name": "x", "metric": "y", "value": 1}\'\n')  # fmt: skip
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "QUICK": "1"}


def test_accelerator_script_runs_every_benchmark_and_names_the_failed(tmp_path):
    """A lent GPU gets one run: a benchmark that fails must not stop the ones after it, and the run must say which
    failed (exit 1)."""
    env = _fake_python(tmp_path)
    out = subprocess.run(["bash", "experiments/bench/accelerator.sh"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "# failed: peer " in out.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [
        "memory_tiny-bert.jsonl",
        "memory_tiny-vit.jsonl",
        "mfu_tiny-bert.jsonl",
        "mfu_tiny-bert_b4.jsonl",
        "mfu_tiny-vit.jsonl",
        "mfu_tiny-vit_b4.jsonl",
        "peer.jsonl",
    ]
    assert (tmp_path / "out" / "mfu_tiny-vit.jsonl").read_text().startswith('{"name": "x"')


def test_accelerator_script_stops_before_any_benchmark_when_a_module_is_missing(tmp_path):
    env = _fake_python(tmp_path, env_rc=2)
    out = subprocess.run(["bash", "experiments/bench/accelerator.sh"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and list((tmp_path / "out").iterdir()) == []


def test_accelerator_script_runs_only_the_benchmarks_asked_for(tmp_path):
    """A second lease finishes what the first one's time cut off (ONLY=memory), and a misspelt name is refused."""
    env = _fake_python(tmp_path)
    run = lambda only: subprocess.run(["bash", "experiments/bench/accelerator.sh"], env={**env, "ONLY": only},
                                      capture_output=True, text=True)  # fmt: skip
    assert run("mfu,memory").returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "memory_tiny-bert.jsonl", "memory_tiny-vit.jsonl", "mfu_tiny-bert.jsonl", "mfu_tiny-bert_b4.jsonl",
        "mfu_tiny-vit.jsonl", "mfu_tiny-vit_b4.jsonl"]  # fmt: skip
    out = run("peer,mem")
    assert out.returncode == 2 and "'mem' is none of peer, mfu, memory" in out.stderr


def test_environment_check_names_each_missing_module_with_its_pinned_package(tmp_path, monkeypatch):
    """A GPU image with jax and torch but no grain (the one lent here) must be told so in seconds, with what to install
    (the pins of requirements.txt), before its minutes go to benchmarks that would each fail in turn."""
    pinned = environment.pins()
    assert pinned["jax"] == environment.version("jax") and pinned["grain"] == environment.version("grain")
    (tmp_path / "needs_absent.py").write_text("import tljax_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gone = environment.missing({"grain": "grain", "nothing": "tljax_absent_module"}, ("needs_absent", "tljax.engine"))
    assert gone == ["tljax_absent_module", "tljax_absent_dependency"]
    message = environment.report(["grain", "ml_collections", "tljax_absent_module"], pinned)
    assert (
        f"pip install grain=={pinned['grain']} ml-collections=={pinned['ml-collections']} tljax_absent_module`"
        in message
    )
    # here everything is present: exit 0, the versions and devices on stderr
    out = subprocess.run([sys.executable, "-m", "experiments.bench.environment"], capture_output=True, text=True)
    assert out.returncode == 0 and f"# jax {pinned['jax']}, " in out.stderr and "# devices: " in out.stderr


def test_largest_batch_brackets_the_boundary():
    for boundary in (1, 7, 37, 100):
        calls = []
        fits = lambda b, calls=calls, boundary=boundary: calls.append(b) or b <= boundary
        best, capped = memory.largest_batch(fits, 1, 1024)
        assert not capped and best <= boundary and boundary - best <= max(1, boundary // 8)
        assert len(calls) <= 2 * math.log2(boundary + 1) + 2
    assert memory.largest_batch(lambda b: True, 4, 50) == (32, True)
    assert memory.largest_batch(lambda b: False, 1, 50) == (0, False)
    assert memory.largest_batch(lambda b: False, 32, 50) == (0, False)


def test_memory_search_starts_from_the_benchmark_batch_when_it_is_over_the_cap(monkeypatch):
    """The search went back to batch 1 and doubled when the benchmark batch was over the cap: the tiny BERT's full
    fine-tuning (7 fits at batch 8) took 6 probes of ~4 s each (8, 1, 2, 4, 6, 7); from the batch it takes 4."""
    import types

    probed = []

    def probe(loaded, s, part, batch_size, steps=2):
        probed.append(batch_size)
        return {"batch": batch_size, "train_mb": 10.0 * batch_size, "peak_mb": 0.0, "peak_kind": "rss",
                "opt_state_mb": 0.0, "xla_step_mb": 0.0}  # fmt: skip

    monkeypatch.setattr(memory, "probe", probe)
    monkeypatch.setattr(memory.peer, "jax_load", lambda s: None)
    monkeypatch.setattr(memory.peer, "make_batch", lambda s, b=None: None)
    monkeypatch.setattr(memory.peer, "jax_partition", lambda *a: types.SimpleNamespace(count=lambda trainable: 1))
    r = memory.measure({"batch": 8}, "full", cap_mb=75.0, limit=16)
    assert (r["largest_batch"], r["search_capped"], r["train_mb"]) == (7, False, 80.0)
    assert probed == [8, 4, 6, 7]


QUICK_METRICS = {  # every other benchmark's --quick run: the metrics its README figures come from
    "pipeline": {("pipeline/text", "pipeline_over_step"), ("pipeline/image", "pipeline_over_step")},
    "probe_cache": {("probe_cache", "cached_probe_speedup")},
    "vmap_seeds": {("vmap_seeds", "vmap_seeds_speedup"), ("vmap_seeds", "final_loss_max_abs_diff")},
    "prefix_cache": {("prefix_cache/top_1", "prefix_cache_speedup_top1"),
                     ("prefix_cache/top_3", "prefix_cache_speedup_top3")},
    "peft": {("peft/lora_r8", "lora_over_full_memory"), ("peft/lora_r8", "lora_over_full_step"),
             ("peft/lora_r8", "lora_over_full_memory_remat"), ("peft/lora_r8_remat", "lora_remat_over_full_memory")},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(QUICK_METRICS))  # not `benchmark`: pytest-benchmark's fixture name
def test_every_other_benchmark_quick_prints_its_metrics(name):
    rows = _bench(name, "--quick")
    assert QUICK_METRICS[name] <= set(rows)
    if name == "vmap_seeds":  # K runs in one program train what K engine.fit runs train
        assert rows[("vmap_seeds", "final_loss_max_abs_diff")]["value"] < 1e-5
    if name == "peft":  # LoRA keeps optimizer state for its factors only
        opt = lambda v: rows[(f"peft/{v}", "opt_state_mb")]["value"]
        assert opt("lora_r8") < 0.1 * opt("full") and opt("head_only") < opt("lora_r8")


def test_peer_data_parallel_worker_runs_the_same_step(tmp_path):
    """--jax_devices 2: the tljax worker's data-parallel step (the engine's placement) computes the one-device
    step's loss and update on the same batch; a count that does not divide the batch is refused up front."""
    import jax
    import numpy as np

    s = peer.checkpoints(["tiny-bert"], str(tmp_path))["tiny-bert"]
    loaded = peer.jax_load(s)
    local = peer.make_batch(s)
    one, state1, _ = peer.jax_step(loaded, "full", jax.device_put(local))
    placed, state2, batch2 = peer.jax_placed_step(loaded, "full", local, devices=2)
    state1, m1 = one(state1, jax.device_put(local))
    state2, m2 = placed(state2, batch2)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state1.params, state2.params)
    assert max(jax.tree.leaves(diff)) < 1e-5
    with pytest.raises(ValueError, match="--jax_devices 3: needs a positive count that divides"):
        peer.run(True, models="tiny-bert", jax_devices=3)


def test_benchmark_scratch_checkpoints_are_removed_at_exit():
    """Every --quick benchmark and test wrote a random checkpoint to /tmp and left it there (dozens a day)."""
    code = "from experiments.bench import common; print(common.tiny_bert_dir())"
    folder = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1]
    assert folder.startswith(tempfile.gettempdir()) and "tljax-bench-" in folder
    assert not os.path.exists(folder)


def test_profile_quick_splits_the_traced_step_by_kind(tmp_path):
    rows = _bench("profile", "--quick", "--jax_devices", "2", "--trace_dir", str(tmp_path / "trace"), "--top", "5")
    at = lambda m: rows[("profile/tiny-bert/full", m)]
    kinds = {k: at(f"{k}_ms") for k in profile.KINDS}
    assert sum(r["share"] for r in kinds.values()) == pytest.approx(1.0)
    assert kinds["matmul"]["value"] > 0 and kinds["elementwise"]["value"] > 0
    assert kinds["collective"]["value"] > 0  # two devices all-reduce their gradients
    assert 0 < at("busy")["value"] <= 1.05 and at("busy")["threads"] >= 1
    for metric in ("op_ms", "source_ms"):
        ops = [r for (_, m), r in rows.items() if m == metric]
        assert len(ops) == 5 and all(r["kind"] in profile.KINDS for r in ops)
        assert all(r["name"].startswith(f"profile/tiny-bert/full/{r['kind']}/") for r in ops)
        assert [r["value"] for r in ops] == sorted((r["value"] for r in ops), reverse=True)
    sources = {r["name"].split("/", 4)[4]: r["kind"] for (_, m), r in rows.items() if m == "source_ms"}
    assert all(s.split("/")[0] in ("forward", "backward", "step") for s, k in sources.items()
               if k in ("matmul", "elementwise", "layout")), sources  # fmt: skip
    assert all("dot_general" in s for s, k in sources.items() if k == "matmul")  # products named by their source
    assert list(tmp_path.joinpath("trace").rglob("perfetto_trace.json.gz"))  # kept for a viewer


def test_profile_charges_each_operation_its_exclusive_time_on_compute_threads():
    meta = lambda tid, name: {"ph": "M", "name": "thread_name", "tid": tid, "args": {"name": name}}
    op = lambda tid, name, ts, dur: {"ph": "X", "tid": tid, "name": name, "ts": ts, "dur": dur}
    trace = {"traceEvents": [
        meta(1, "tf_XLAEigen/1"), meta(2, "tf_XLAEigen/2"), meta(3, "python3"),
        op(1, "ThunkExecutor::Execute", 0, 100), op(1, "ynn_fusion.3", 10, 50), op(1, "copy_bitcast_fusion.1", 70, 20),
        op(2, "ThunkExecutor::Execute", 0, 100), op(2, "all-reduce.7", 5, 40), op(2, "Rendezvous", 10, 30),
        op(2, "ynn_fusion.4", 50, 40), op(3, "PjitFunction(jit(train_step))", 0, 1000),
    ]}  # fmt: skip
    times, threads = profile.exclusive_times(trace)
    assert threads == 2 and "PjitFunction(jit(train_step))" not in times
    assert times == {"ThunkExecutor::Execute": 30 + 20, "ynn_fusion.3": 50, "copy_bitcast_fusion.1": 20,
                     "all-reduce.7": 10, "Rendezvous": 30, "ynn_fusion.4": 40}  # fmt: skip
    b = profile.breakdown(trace, steps=1, step_s=100e-6)
    assert b["kinds_ms"] == pytest.approx({"matmul": 0.09, "elementwise": 0.0, "layout": 0.02, "collective": 0.04,
                                           "runtime": 0.05})  # fmt: skip
    assert b["busy"] == pytest.approx(1.0) and list(b["ops_ms"])[0] == ("matmul", "ynn_fusion")
    with pytest.raises(ValueError, match="not an XLA:CPU trace"):
        profile.breakdown({"traceEvents": [meta(3, "python3")]}, 1, 1.0)


HLO = """HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0: f32[8,4], param_1: f32[4,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: f32[8,4], param_1.1: f32[]) -> f32[8,4] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  %param_1.1 = f32[] parameter(1)
  %reduce.1 = f32[8]{0} reduce(%param_0.1, %param_1.1), dimensions={1}, to_apply=%max
  ROOT %exp.1 = f32[8,4]{1,0} exponential(%param_0.1)
}

ENTRY %main.9 (p0: f32[8,4], p1: f32[4,4]) -> (f32[8,4], f32[8,4]) {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  %ynn_fusion.1 = f32[8,4]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.1,
  %ynn_fusion.2 = f32[8,4]{1,0} fusion(%ynn_fusion.1, %p1), kind=kCustom, calls=%fused_computation.2,
  %add.3 = (f32[8,4]{1,0}, f32[8,4]{1,0}) add(%p0, %p0), metadata={op_name="jit(train_step)/add"}
  ROOT %tuple = (f32[8,4]{1,0}, f32[8,4]{1,0}) tuple(%ynn_fusion.1, %ynn_fusion.2)
}
"""


def test_profile_tells_products_from_other_ynnpack_fusions_and_names_their_source():
    """XLA:CPU hands reductions and exponentials to YNNPACK too: counting every `ynn_fusion` as a matmul overstated
    MiniLM-L6's matmul share (66% against 61%) and understated the products' rate (336 against 366 GFLOP/s)."""
    metadata = {
        "ynn_fusion.1": "jit(train_step)/transpose(jvp(WithHead))/backbone/encoder/layer_11/mlp/fc1/dot_general",
        "ynn_fusion.2": "jit(train_step)/jvp(WithHead)/backbone/encoder/layer_2/attention/reduce_max;jit(f)/jvp(M)/x",
    }
    text = HLO
    for name, op_name in metadata.items():  # HLO's lines are longer than ours
        text = text.replace(f"calls=%fused_computation.{name[-1]},", f'calls=%fused_computation.{name[-1]}, '
                            f'metadata={{op_name="{op_name}" stack_frame_id=3}}')  # fmt: skip
    hlo = profile.hlo_ops(text)
    assert hlo["ynn_fusion.1"]["products"] and not hlo["ynn_fusion.2"]["products"]
    assert hlo["ynn_fusion.1"]["source"] == "backward/backbone/encoder/layer_*/mlp/fc1/dot_general"
    assert hlo["ynn_fusion.2"]["source"] == "forward/backbone/encoder/layer_*/attention/reduce_max"
    assert hlo["add.3"]["source"] == "step/add"
    combined = "jit(train_step)/(transpose(jvp(M))/a/layer_0/b:transpose(jvp(M))/c:jvp()/d)"  # merged all-reduces
    assert profile.source(combined) == "backward/a/layer_*/b (+2 more)"
    branch = "jit(train_step)/jvp(M)/encoder/layer_3/mlp/fc1/cond/branch_0_fun/dot_general"  # platform_dependent
    assert profile.source(branch) == "forward/encoder/layer_*/mlp/fc1/dot_general"
    assert profile.kind("ynn_fusion.2", hlo) == "elementwise" and profile.kind("ynn_fusion.1", hlo) == "matmul"
    assert profile.kind("ynn_fusion.2") == "matmul"  # without the program, by name only
    # oneDNN's products (`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot`) are matmuls too:
    # they were counted as elementwise, and the matmul share of a step that ran them read 0
    assert profile.kind("onednn_fusion.7") == "matmul" and profile.kind("xnn_fusion") == "matmul"
    meta = {"ph": "M", "name": "thread_name", "tid": 1, "args": {"name": "tf_XLAEigen/1"}}
    op = lambda name, ts, dur: {"ph": "X", "tid": 1, "name": name, "ts": ts, "dur": dur}
    # `end: ynn_fusion.2`: the completion of an operation XLA:CPU ran asynchronously, charged to that operation
    trace = {"traceEvents": [meta, op("ynn_fusion.1", 0, 60), op("ynn_fusion.2", 60, 20), op("add.3", 90, 10),
                             op("end: ynn_fusion.2", 80, 10)]}  # fmt: skip
    b = profile.breakdown(trace, steps=1, step_s=100e-6, hlo=hlo)
    assert b["kinds_ms"]["matmul"] == pytest.approx(0.06) and b["kinds_ms"]["elementwise"] == pytest.approx(0.04)
    assert b["ops_ms"] == pytest.approx({("matmul", "ynn_fusion"): 0.06, ("elementwise", "ynn_fusion"): 0.03,
                                         ("elementwise", "add"): 0.01})  # fmt: skip
    assert list(b["sources_ms"]) == [("matmul", "backward/backbone/encoder/layer_*/mlp/fc1/dot_general"),
                                     ("elementwise", "forward/backbone/encoder/layer_*/attention/reduce_max"),
                                     ("elementwise", "step/add")]  # fmt: skip
