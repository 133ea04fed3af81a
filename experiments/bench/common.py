"""What every benchmark shares: JSON lines, a timer, the benchmark model and its batch."""

from __future__ import annotations

import atexit
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

import tljax.models as tm
from tljax.assets import minilm_path


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


# the vector extensions that decide a CPU figure: YNNPACK's and MKL's kernels differ most between these
_ISA = (("avx512f", "avx512"), ("avx512_bf16", "avx512_bf16"), ("amx_tile", "amx"))


def host_cpu(cpuinfo: str | None = None) -> str:
    """The host CPU's model and widest vector extensions, e.g. "Intel(R) Xeon(R) Processor (avx512, avx512_bf16,
    amx)": every CPU row carries it, since the same command gives different ratios on different CPUs (PyTorch's
    float32 GEMM ran at half of XLA's on a Zen 5 and 1.14x XLA's on a Xeon with AMX). `cpuinfo`: /proc/cpuinfo's
    text (read when None; where there is none, the platform module's processor name)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine()
    pairs = (line.partition(":") for line in cpuinfo.splitlines())
    fields = {key.strip(): value.strip() for key, _, value in pairs if value}
    flags = set(fields.get("flags", "").split())
    isa = [name for flag, name in _ISA if flag in flags] or (["avx2"] if "avx2" in flags else [])
    model = fields.get("model name") or platform.processor() or platform.machine()
    return f"{model} ({', '.join(isa)})" if isa else model


def status_mb(field: str) -> float:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss() -> None:
    """Linux: restart the VmHWM high-water mark, so compilation's own memory is not counted as training's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def xla_step_bytes(compiled) -> int:
    """XLA's account of a compiled step's memory: arguments + outputs not aliased to them + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def scratch_dir(prefix: str = "tljax-bench-") -> str:
    """A temporary folder for the benchmark's random checkpoints, removed when the process exits (every `--quick`
    run and test used to leave one behind in /tmp)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def tiny_bert_dir() -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = scratch_dir()
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


def token_batch(batch: int, seq: int, vocab: int, classes: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1000 % vocab, vocab, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "labels": rng.integers(0, classes, (batch,)).astype(np.int32),
    }


def setup(quick: bool, folder: str | None = None, **family_options):
    """The benchmark model (real MiniLM-L6, batch 32 x 128; tiny random BERT with --quick, from `folder` if given),
    a batch, and the fields every JSON line carries. `family_options` go to the family's build (`remat="block"`)."""
    if quick:
        folder, batch_size, seq = folder or tiny_bert_dir(), 8, 32
    else:
        folder, batch_size, seq = str(minilm_path()), 32, 128
    loaded = tm.load_pretrained(folder, num_classes=4, pooling="mean", **family_options)
    batch = token_batch(batch_size, seq, loaded.hf_config.vocab_size, 4)
    common = {
        "model": "tiny-bert" if quick else "all-MiniLM-L6-v2",
        "batch": batch_size,
        "seq": seq,
        "device": jax.devices()[0].platform,
    }
    return loaded, batch, common
