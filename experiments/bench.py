"""Benchmarks that print one JSON object per line, with ratios measured side by side in one run.

    python -m experiments.bench freeze            # real MiniLM-L6, batch 32, seq 128 (CPU: a few minutes)
    python -m experiments.bench freeze --quick    # tiny random BERT, seconds
    python -m experiments.bench schedule          # gradual unfreezing: step and compile time per phase
    python -m experiments.bench fsdp              # bytes of params + optimizer state per device, data vs FSDP

`freeze` measures what a partition costs: step time of head-only / top-k / full fine-tuning against a forward
pass, the same partitions done the naive way (Adam with learning rate 0 on frozen groups), XLA's FLOP count of
each compiled step, and optimizer-state bytes against trainable bytes. `fsdp` runs on 8 fake CPU devices unless
XLA_FLAGS already sets a device count (on an accelerator host: its devices).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import tljax.models as tm
from tljax import partition as P
from tljax import rules, task
from tljax.assets import minilm_path
from tljax.losses import model_inputs
from tljax.step import init_state, make_train_step


def emit(name: str, metric: str, value, **extra) -> dict:
    """Prints one JSON line and returns it."""
    row = {"name": name, "metric": metric, "value": value, **extra}
    print(json.dumps(row), flush=True)
    return row


def time_fn(fn: Callable, *args, reps: int, warmup: int = 2) -> float:
    """Median wall seconds of `fn(*args)` (blocked until ready) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _tiny_bert_dir() -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="tljax-bench-")
    cfg = BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(folder)
    return folder


def _batch(batch: int, seq: int, vocab: int, classes: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1000 % vocab, vocab, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "labels": rng.integers(0, classes, (batch,)).astype(np.int32),
    }


def _setup(quick: bool):
    """The benchmark model (real MiniLM-L6, batch 32 x 128; tiny random BERT with --quick), a batch, and the
    fields every JSON line carries."""
    folder, batch_size, seq = (_tiny_bert_dir(), 8, 32) if quick else (str(minilm_path()), 32, 128)
    loaded = tm.load_pretrained(folder, num_classes=4, pooling="mean")
    batch = _batch(batch_size, seq, loaded.hf_config.vocab_size, 4)
    common = {
        "model": "tiny-bert" if quick else "all-MiniLM-L6-v2",
        "batch": batch_size,
        "seq": seq,
        "device": jax.devices()[0].platform,
    }
    return loaded, batch, common


def _naive(rule_list):
    """The same partition done the naive way: frozen groups become Adam with learning rate 0."""
    return [(rx, P.train(lr=0.0, weight_decay=0.0) if not P.as_rule(r).trainable else r) for rx, r in rule_list]


def _measure_step(loaded, rule_list, batch, reps) -> dict:
    unused = task.unused_params(loaded.model, loaded.params, batch)  # mean pooling: the pooler
    part = P.build(loaded.params, rule_list, learning_rate=1e-4, weight_decay=0.01, unused=unused)
    step = jax.jit(make_train_step(loaded.model, part), donate_argnums=0)
    state = init_state(jax.tree.map(jnp.copy, loaded.params), part.tx)  # the step donates its state
    compiled = step.lower(state, batch).compile()
    flops = compiled.cost_analysis().get("flops", float("nan"))
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    seconds = time_fn(run, reps=reps)
    return {
        "seconds": seconds,
        "flops": flops,
        "opt_bytes": P.state_nbytes(state.opt_state),
        "trainable_bytes": part.nbytes(True),
        "trainable_params": part.count(True),
    }


def _measure_forward(loaded, batch, reps) -> tuple[float, float]:
    fwd = jax.jit(
        lambda params, b: loaded.model.apply(
            {"params": params}, **model_inputs(b), train=True, rngs={"dropout": jax.random.key(0)}
        )["logits"]
    )
    compiled = fwd.lower(loaded.params, batch).compile()
    return time_fn(compiled, loaded.params, batch, reps=reps), compiled.cost_analysis().get("flops", float("nan"))


def bench_freeze(quick: bool) -> list[dict]:
    reps = 3 if quick else 5
    loaded, batch, common = _setup(quick)
    n = loaded.family.num_layers(loaded.hf_config)
    fwd_s, fwd_flops = _measure_forward(loaded, batch, reps)
    out = [emit("freeze/forward", "step_ms", 1e3 * fwd_s, flops=fwd_flops, **common)]
    partitions = {
        "head_only": rules.linear_probe(loaded),
        "top_1": rules.top_k(loaded, 1),
        f"top_{n // 2}": rules.top_k(loaded, n // 2),
        "full": rules.full(loaded),
    }
    results = {}
    for name, rule_list in partitions.items():
        results[name] = r = _measure_step(loaded, rule_list, batch, reps)
        out.append(
            emit(
                f"freeze/{name}",
                "step_ms",
                1e3 * r["seconds"],
                flops=r["flops"],
                trainable_params=r["trainable_params"],
                opt_state_bytes=r["opt_bytes"],
                **common,
            )
        )
        out.append(
            emit(f"freeze/{name}", "opt_state_over_trainable_bytes", r["opt_bytes"] / r["trainable_bytes"], **common)
        )
        if name != "full":
            naive = _measure_step(loaded, _naive(rule_list), batch, reps)
            out.append(
                emit(
                    f"freeze/{name}_naive",
                    "step_ms",
                    1e3 * naive["seconds"],
                    flops=naive["flops"],
                    opt_state_bytes=naive["opt_bytes"],
                    **common,
                )
            )
            out.append(emit(f"freeze/{name}", "speedup_over_naive", naive["seconds"] / r["seconds"], **common))
    full = results["full"]
    out.append(
        emit(
            "freeze/head_only",
            "head_only_over_forward",
            results["head_only"]["seconds"] / fwd_s,
            target="<= 1.15",
            **common,
        )
    )
    for name, r in results.items():
        if name.startswith("top_"):
            out.append(
                emit(
                    f"freeze/{name}",
                    "time_over_full",
                    r["seconds"] / full["seconds"],
                    flop_share=r["flops"] / full["flops"],
                    **common,
                )
            )
    return out


def bench_schedule(quick: bool) -> list[dict]:
    """Gradual unfreezing (ULMFiT) on MiniLM: compile and step time per phase, cold and with the persistent
    compilation cache warm (the second run of the same ablation)."""
    import itertools

    from tljax import engine, freezing

    steps = 2 if quick else 3
    engine.enable_compilation_cache(tempfile.mkdtemp(prefix="tljax-cache-"))
    loaded, batch, common = _setup(quick)
    sched = freezing.get("gradual_unfreeze", loaded, steps_per_stage=steps, lr=1e-4, decay=1 / 2.6)
    config = engine.EngineConfig(devices=1, progress=False, optimizer={"weight_decay": 0.01})
    runs = [engine.fit(loaded, sched, itertools.repeat(batch), config).history for _ in range(2)]
    out = []
    for cold, warm in zip(*runs, strict=True):
        out.append(
            emit(
                f"schedule/gradual_unfreeze/{cold.name}",
                "step_ms",
                1e3 * cold.step_seconds,
                phase=cold.index,
                trainable_params=cold.trainable_params,
                compile_s=cold.compile_seconds,
                compile_s_cached=warm.compile_seconds,
                **common,
            )
        )
    first, last = runs[0][0], runs[0][-1]
    out.append(
        emit("schedule/gradual_unfreeze", "last_over_first_step", last.step_seconds / first.step_seconds, **common)
    )
    out.append(
        emit(
            "schedule/gradual_unfreeze",
            "compile_cached_over_cold",
            sum(r.compile_seconds for r in runs[1]) / sum(r.compile_seconds for r in runs[0]),
            **common,
        )
    )
    return out


def bench_fsdp(quick: bool) -> list[dict]:
    """Bytes of params + AdamW state on the fullest device, full fine-tuning, data parallel vs FSDP: the state is
    built inside jit with output shardings, so under FSDP each device only ever holds its share."""
    from tljax import engine, parallel

    loaded, _, common = _setup(quick)
    part = P.build(loaded.params, rules.full(loaded), learning_rate=1e-4, weight_decay=0.01)
    common = {**common, "devices": jax.device_count()}
    out, worst = [], {}
    for mode in ("data", "fsdp"):
        state = engine.initial_state(
            loaded, part, parallel.Placement(mode, fsdp_min_size=0 if quick else parallel.FSDP_MIN_SIZE)
        )
        per_device = parallel.device_bytes((state.params, state.opt_state))
        worst[mode] = max(per_device.values())
        out.append(emit(f"fsdp/{mode}", "max_device_state_mb", worst[mode] / 2**20, **common))
        del state
    out.append(
        emit(
            "fsdp", "fsdp_over_data_device_bytes", worst["fsdp"] / worst["data"], ideal=1 / jax.device_count(), **common
        )
    )
    return out


BENCHMARKS = {"freeze": bench_freeze, "schedule": bench_schedule, "fsdp": bench_fsdp}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few seconds")
    args = parser.parse_args(argv)
    if args.benchmark == "fsdp" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        # before the first device query: JAX reads XLA_FLAGS when it creates the CPU backend
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    BENCHMARKS[args.benchmark](args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
