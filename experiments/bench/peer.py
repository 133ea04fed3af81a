"""`peer`: tljax against PyTorch + transformers fine-tuning the same checkpoint, side by side in one run.

Both sides load the same HF folder (real MiniLM-L6; random BERT-base / ViT-B/16 checkpoints written once into a temp
dir), take the same batch (same NumPy seed), the same loss and AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight
decay 0.01 except biases and norms), dropout on, fp32 on CPU (bf16 compute on GPU: tljax `dtype="bfloat16"` with
fp32 params, torch `autocast(bfloat16)`). Each side runs in its own process (two frameworks in one process fight over
the cores), both compile / warm up first, then the parent alternates them for several rounds (the side that goes
first alternates too) while the other waits idle on its stdin; step times are the median of all timed steps.

Modes: `full` (everything trains), `top3` (head, pooler / final norm and the top 3 blocks; tljax `rules.top_k`,
torch `requires_grad=False` on the rest), `head` (the classifier only; `rules.linear_probe`).
`full_ft_over_torch`, `top3_over_torch`, `head_over_torch` = tljax examples/s over PyTorch examples/s (> 1: tljax
is faster). In the same rounds each side also times its framework's product of the model's largest shape
(`gemm_shape`, in its step's precision): `tljax_gemm_gflops`, `torch_gemm_gflops` and `gemm_over_torch` say how
much of a ratio is the two matrix-multiply libraries rather than the rest of the step.

    python -m experiments.bench peer                                   # MiniLM-L6, BERT-base, ViT-B/16: slow on CPU
    python -m experiments.bench peer --models minilm --modes full,head
    python -m experiments.bench peer --quick                           # tiny random BERT and ViT, seconds
    python -m experiments.bench peer --models minilm --jax_devices 2   # tljax data parallel over 2 CPU devices

`--jax_devices N` runs the tljax side data parallel over N devices (`parallel.Placement("data")`, the engine's
default; the same global batch and gradients): on a CPU, N fake devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, e.g. one per core), which XLA:CPU runs concurrently. PyTorch
stays eager on its default threads. Rows carry `jax_devices`.

This module holds the orchestration, the model specs and the tljax worker; `torch_side.py` is the PyTorch worker.
It imports no JAX at module level, so the parent and the PyTorch process never load it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

OPTIMIZER = {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
MODES = ("full", "top3", "head")
ALL_MODES = ",".join(MODES)
RATIO_METRIC = {"full": "full_ft_over_torch", "top3": "top3_over_torch", "head": "head_over_torch"}
TOP_K = 3
CLASSES = 4
GEMM = "gemm"  # each worker's pseudo-mode: its framework's product of `gemm_shape`, timed in the same rounds
GEMM_SECONDS = 0.2  # one timed GEMM call repeats the product for about this long
MARK = "@@ "  # protocol lines on a worker's stdout start with this; anything else (library chatter) is skipped

# name -> kind, HF config (None: the real checkpoint), batch, seq (text) / image size (vision)
MODELS = {
    "minilm": {"kind": "text", "config": None, "batch": 32, "seq": 128},
    "bert-base": {"kind": "text", "config": {}, "batch": 32, "seq": 128},  # BertConfig() defaults: 12 x 768
    "vit-b16": {"kind": "image", "config": {}, "batch": 32, "image": 224},  # ViTConfig() defaults: 12 x 768, /16
    "tiny-bert": {"kind": "text", "batch": 8, "seq": 32, "config": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64)},
    "tiny-vit": {"kind": "image", "batch": 8, "image": 32, "config": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8)},
}  # fmt: skip
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION = ("eager", "fused")  # tljax's `attention` family option; "fused" turns attention dropout off on both sides
DEFAULT_MODELS = ("minilm", "bert-base", "vit-b16")
QUICK_MODELS = ("tiny-bert", "tiny-vit")


def spec(name: str, folder: str) -> dict:
    """Everything a worker needs to build its side: the model entry, its checkpoint folder and the class count."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return {"name": name, "folder": folder, "classes": CLASSES, **MODELS[name]}


def bf16(s: dict, platform: str) -> bool:
    """Whether a worker computes in bf16: the spec's `precision` "bf16", or "auto" (the default) on an accelerator.
    `bf16` on a CPU runs the accelerator's code path (tljax bf16 compute, torch CPU autocast) where it can be tested."""
    precision = check_precision(s.get("precision", "auto"))
    return precision == "bf16" or (precision == "auto" and platform != "cpu")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {PRECISIONS}")
    return precision


def precision_name(s: dict, platform: str, side: str) -> str:
    """What a worker reports as its precision."""
    if not bf16(s, platform):
        return "fp32"
    return "bf16 compute, fp32 params" if side == "tljax" else "bf16 autocast"


def add_precision_argument(parser) -> None:
    """--precision and --attention: how the benchmark model computes (`checkpoints` takes both)."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: fp32 on CPU, bf16 compute on an accelerator; fp32 / bf16 anywhere")  # fmt: skip
    parser.add_argument("--attention", choices=ATTENTION, default="eager",
                        help="tljax's attention: eager (default) or fused (jax.nn.dot_product_attention, cuDNN's "
                        "kernel on a GPU in bf16); fused: no attention dropout on either side")  # fmt: skip


def attention_dropout_off(s: dict) -> dict:
    """Family options that turn attention dropout off where the spec's attention is "fused" (both sides, so that
    they train the same model); {} otherwise."""
    return {"attention_dropout": 0.0} if s.get("attention", "eager") == "fused" else {}


def make_batch(s: dict, batch: int | None = None) -> dict[str, np.ndarray]:
    """The benchmark batch as NumPy arrays (same seed on both sides): tokens or NCHW pixels, plus labels."""
    rng = np.random.default_rng(0)
    n = batch or s["batch"]
    labels = rng.integers(0, s["classes"], (n,)).astype(np.int32)
    if s["kind"] == "image":
        pixels = rng.standard_normal((n, 3, s["image"], s["image"])).astype(np.float32)
        return {"pixel_values": pixels, "labels": labels}
    vocab = s["vocab_size"]
    ids = rng.integers(1000 % vocab, vocab, (n, s["seq"])).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def tokens_per_example(s: dict) -> int:
    """Sequence positions the encoder sees per example (ViT: patches + CLS)."""
    return s["seq"] if s["kind"] == "text" else (s["image"] // s["patch_size"]) ** 2 + 1


def gemm_shape(s: dict) -> tuple[int, int, int]:
    """(m, k, n) of the model's largest training product, its MLP's first layer over the whole batch: (batch x
    tokens, hidden) @ (hidden, intermediate). Each side's rate on it tells how much of a `peer` ratio is the two
    frameworks' matrix-multiply kernels (on some CPUs PyTorch's MKL runs float32 products at half of XLA's)."""
    return s["batch"] * tokens_per_example(s), s["hidden"], s["intermediate"]


def repeated(once, finish, flops: int, seconds: float = GEMM_SECONDS) -> tuple:
    """(a function running `once` back to back for about `seconds`, then `finish` on its last result; the FLOPs
    of one such call): each worker's GEMM, calibrated on its own device so that timer and dispatch noise vanish."""
    import time

    for _ in range(2):  # warm-up: compilation, allocation, autotuning
        finish(once())
    t = time.perf_counter()
    finish(once())
    calls = max(1, round(seconds / max(time.perf_counter() - t, 1e-9)))

    def run():
        for _ in range(calls):
            out = once()
        finish(out)

    return run, calls * flops


def checkpoints(names, folder: str, precision: str = "auto", attention: str = "eager") -> dict[str, dict]:
    """Specs for `names` computing in `precision` with tljax's `attention`, random checkpoints written into `folder`
    (needs torch: call from a parent process)."""
    from experiments.bench import torch_side

    check_precision(precision)
    if attention not in ATTENTION:
        raise ValueError(f"--attention {attention!r}: choose one of {ATTENTION}")
    specs = {n: torch_side.with_checkpoint(spec(n, ""), folder) for n in names}
    return {n: {**s, "precision": precision, "attention": attention} for n, s in specs.items()}


# --- the tljax worker -------------------------------------------------------------------------------------------


def jax_load(s: dict, **options):
    """`load_pretrained` on the spec's folder with a classification head, fp32 params, bf16 compute where `bf16`
    says; `options`: family options (`dropout=0.0`, ...)."""
    import jax

    import tljax.models as tm

    dtype = "bfloat16" if bf16(s, jax.devices()[0].platform) else "float32"
    options = {"attention": s.get("attention", "eager"), **attention_dropout_off(s), **options}
    return tm.load_pretrained(
        s["folder"], num_classes=s["classes"], pooling="pooler" if s["kind"] == "text" else "cls",
        dtype=dtype, param_dtype="float32", **options,
    )  # fmt: skip


def jax_rules(loaded, mode: str):
    from tljax import rules

    return {"full": rules.full, "top3": lambda m: rules.top_k(m, TOP_K), "head": rules.linear_probe}[mode](loaded)


def jax_partition(loaded, mode: str, batch):
    """The `Partition` of a mode with the benchmark's AdamW (parameters the loss never reaches: frozen)."""
    from tljax import partition, task

    unused = task.unused_params(loaded.model, loaded.params, batch)
    return partition.build(loaded.params, jax_rules(loaded, mode), unused=unused, **OPTIMIZER)


def fresh_state(loaded, part):
    """A new train state over a copy of the loaded params (the step donates its state)."""
    import jax
    import jax.numpy as jnp

    from tljax.step import init_state

    return init_state(jax.tree.map(jnp.copy, loaded.params), part.tx)


def jax_compile(loaded, part, batch):
    """The jitted `make_train_step` (state donated) compiled for this batch's shapes; allocates no state."""
    import jax

    from tljax.parallel import compiler_options
    from tljax.step import make_train_step

    abstract = jax.eval_shape(lambda: fresh_state(loaded, part))
    lowered = jax.jit(make_train_step(loaded.model, part), donate_argnums=0).lower(abstract, batch)
    return lowered.compile(compiler_options=compiler_options())  # as engine.fit compiles it


def jax_step(loaded, mode: str, batch):
    """(compiled step, fresh state, partition) for one mode."""
    part = jax_partition(loaded, mode, batch)
    return jax_compile(loaded, part, batch), fresh_state(loaded, part), part


def jax_steps(s: dict, modes) -> dict:
    """mode -> a zero-argument function running one blocking train step (data parallel over `s["devices"]` > 1
    devices: the engine's placement, state and batch sharded as `engine.fit` does)."""
    import jax

    loaded = jax_load(s)
    devices = s.get("devices", 1)
    steps = {}
    for mode in modes:
        if devices > 1:
            compiled, state, batch = jax_placed_step(loaded, mode, make_batch(s), devices)
        else:
            batch = jax.device_put(make_batch(s))
            compiled, state, _ = jax_step(loaded, mode, batch)
        holder = {"state": state}

        def one(compiled=compiled, holder=holder, batch=batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])

        steps[mode] = one
    return steps


def jax_placed_step(loaded, mode: str, local: dict, devices: int, parallel_mode: str = "data", **placement_options):
    """(compiled step, placed state, placed batch) of one mode over `devices` devices with the engine's placement
    (`parallel_mode` "data" or "fsdp"; `placement_options` such as fsdp_min_size)."""
    from tljax import engine, parallel
    from tljax.step import make_train_step

    placement = parallel.Placement(parallel_mode, devices=devices, **placement_options)
    part = jax_partition(loaded, mode, local)
    state = engine.initial_state(loaded, part, placement)
    batch = placement.batch(local)
    make = lambda axis: make_train_step(loaded.model, part, axis_name=axis)
    return placement.compile(make, state, batch), state, batch


def jax_gemm(s: dict) -> tuple:
    """`gemm_shape`'s product as the tljax step computes it (`products.affine`, in the step's dtype; rows split
    over `s["devices"]` devices like the batch), for `repeated`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tljax.models.products import affine

    dtype = jnp.bfloat16 if bf16(s, jax.devices()[0].platform) else jnp.float32
    m, k, n = gemm_shape(s)
    mesh = Mesh(np.array(jax.devices()[: s.get("devices", 1)]), ("data",))
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.device_put(jax.random.normal(kx, (m, k), dtype), NamedSharding(mesh, PartitionSpec("data")))
    w = jax.device_put(jax.random.normal(kw, (k, n), dtype), NamedSharding(mesh, PartitionSpec()))
    product = jax.jit(affine)
    return repeated(lambda: product(x, w), jax.block_until_ready, 2 * m * k * n)


# --- the protocol both workers speak ----------------------------------------------------------------------------


def send(obj) -> None:
    print(MARK + json.dumps(obj), flush=True)


def serve(steps: dict, info: dict, warmup: int = 2) -> None:
    """Worker loop: warm every mode up, say ready, then answer `<mode> <reps>` lines with the reps' step seconds
    (after one untimed step) until stdin closes."""
    import time

    for one in steps.values():
        for _ in range(warmup):
            one()
    send({"ready": True, **info})
    for line in sys.stdin:
        mode, reps = line.split()
        steps[mode]()
        times = []
        for _ in range(int(reps)):
            t = time.perf_counter()
            steps[mode]()
            times.append(time.perf_counter() - t)
        send({"times": times})


class Worker:
    """A benchmark worker process: started with its command, then asked for timed steps one mode at a time."""

    def __init__(self, side: str, cmd: list[str], env: dict):
        self.side = side
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", **env}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"the {self.side} worker exited with {self.proc.wait()} (its stderr is above)")

    def times(self, mode: str, reps: int) -> list[float]:
        self.proc.stdin.write(f"{mode} {reps}\n")
        self.proc.stdin.flush()
        return self.read()["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _workers(s: dict, modes, threads: str, jax_devices: int = 1) -> tuple[Worker, Worker]:
    arg = json.dumps({**s, "modes": list(modes), "threads": threads, "devices": jax_devices})
    # on a GPU both processes share it: JAX would otherwise reserve 75% of its memory up front
    jax_env, torch_env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ".45")}, {}
    if jax_devices > 1:  # fake CPU devices (ignored by an accelerator platform)
        count = f"--xla_force_host_platform_device_count={jax_devices}"
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        jax_env["XLA_FLAGS"] = f"{flags} {count}".strip()
    if threads == "1":  # XLA:CPU's Eigen pool and PyTorch's OpenMP pool, one thread each
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        jax_env["XLA_FLAGS"] = (jax_env.get("XLA_FLAGS", os.environ.get("XLA_FLAGS", "")) + " " + flags).strip()
        torch_env["OMP_NUM_THREADS"] = "1"
    jax_w = Worker("tljax", [sys.executable, "-m", "experiments.bench.peer", arg], jax_env)
    torch_w = Worker("torch", [sys.executable, "-m", "experiments.bench.torch_side", arg], torch_env)
    return jax_w, torch_w  # both set up at once (not timed); only one runs while the other waits


def compare(s: dict, modes, rounds: int, reps: int, threads: str = "default", jax_devices: int = 1):
    """Alternates the two workers for `rounds` rounds per mode; returns ({side: info}, {mode: {side: seconds}})."""
    jax_w, torch_w = _workers(s, modes, threads, jax_devices)
    try:
        info = {"tljax": jax_w.read(), "torch": torch_w.read()}
        times = {m: {"tljax": [], "torch": []} for m in (*modes, GEMM)}
        for r in range(rounds):
            for mode in times:
                for w in (jax_w, torch_w) if r % 2 == 0 else (torch_w, jax_w):
                    times[mode][w.side] += w.times(mode, reps)
    finally:
        jax_w.close()
        torch_w.close()
    return info, times


def _rows(s: dict, info: dict, times: dict, rounds: int, reps: int, threads: str, jax_devices: int = 1) -> list[dict]:
    from experiments.bench.common import emit, host_cpu

    common = {"model": s["name"], "batch": s["batch"], "device": info["tljax"]["device"], "host_cpu": host_cpu(),
              "rounds": rounds, "reps": reps, "threads": threads, "torch": info["torch"]["version"],
              "torch_threads": info["torch"]["threads"], "precision": info["tljax"]["precision"],
              "torch_precision": info["torch"]["precision"], "jax_devices": jax_devices,
              "xla_flags": info["tljax"]["xla_flags"], "attention": s["attention"]}  # fmt: skip
    common.update({"seq": s["seq"]} if s["kind"] == "text" else {"image": s["image"]})
    rows = []
    times = dict(times)
    gemm = {side: info[side]["gemm_flops"] / statistics.median(ts) / 1e9 for side, ts in times.pop(GEMM).items()}
    m, k, n = gemm_shape(s)
    for side, rate in gemm.items():
        rows.append(emit(f"peer/{s['name']}/{GEMM}", f"{side}_gemm_gflops", rate, shape=f"{m}x{k}x{n}", **common))
    rows.append(emit(f"peer/{s['name']}/{GEMM}", "gemm_over_torch", gemm["tljax"] / gemm["torch"], **common))
    for mode, by_side in times.items():
        per_s = {}
        for side, ts in by_side.items():
            med = statistics.median(ts)
            per_s[side] = s["batch"] / med
            q = np.percentile(ts, [25, 75]) * 1e3
            rows.append(emit(f"peer/{s['name']}/{mode}", f"{side}_step_ms", 1e3 * med, p25=q[0], p75=q[1], **common))
            rows.append(emit(f"peer/{s['name']}/{mode}", f"{side}_examples_per_s", per_s[side], **common))
        ratio = per_s["tljax"] / per_s["torch"]
        rows.append(emit(f"peer/{s['name']}/{mode}", RATIO_METRIC[mode], ratio, **common))
    return rows


def _indivisible(names, devices: int) -> bool:
    return any(MODELS[n]["batch"] % devices for n in names)


def _names(value: str, allowed, what: str) -> list[str]:
    names = [v for v in value.split(",") if v]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--{what} {value!r}: choose a comma-separated subset of {sorted(allowed)}")
    return names


def add_arguments(parser) -> None:
    parser.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)} (default: "
                        f"{','.join(DEFAULT_MODELS)}; --quick: {','.join(QUICK_MODELS)})")  # fmt: skip
    parser.add_argument("--modes", default=ALL_MODES, help=f"comma list of {MODES}")
    parser.add_argument("--rounds", type=int, default=None, help="alternations of the two processes (default 3)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per side per round (default 3)")
    parser.add_argument("--threads", choices=("default", "1"), default=None,
                        help="CPU threads of both sides: each framework's default, or 1 each (--quick's default: "
                        "tiny models gain nothing from threads, and an oversubscribed OpenMP pool stalls)")  # fmt: skip
    parser.add_argument("--jax_devices", type=int, default=1,
                        help="tljax data parallel over N devices (CPU: N fake devices, e.g. one per core)")  # fmt: skip
    add_precision_argument(parser)


def run(
    quick: bool,
    models=None,
    modes=ALL_MODES,
    rounds=None,
    reps=None,
    threads=None,
    jax_devices=1,
    precision="auto",
    attention="eager",
) -> list[dict]:
    names = _names(models or ",".join(QUICK_MODELS if quick else DEFAULT_MODELS), MODELS, "models")
    modes = _names(modes, MODES, "modes")
    rounds, reps = rounds or (2 if quick else 3), reps or (2 if quick else 3)
    threads = threads or ("1" if quick else "default")
    if jax_devices < 1 or _indivisible(names, jax_devices):
        raise ValueError(f"--jax_devices {jax_devices}: needs a positive count that divides every model's batch")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tljax-peer-") as folder:
        for s in checkpoints(names, folder, precision, attention).values():
            info, times = compare(s, modes, rounds, reps, threads, jax_devices)
            rows += _rows(s, info, times, rounds, reps, threads, jax_devices)
    return rows


if __name__ == "__main__":  # the tljax worker (compare() starts it)
    import jax

    _s = json.loads(sys.argv[1])
    _platform = jax.devices()[0].platform
    _gemm, _gemm_flops = jax_gemm(_s)
    serve(
        {**jax_steps(_s, _s["modes"]), GEMM: _gemm},
        {
            "device": jax.devices()[0].device_kind,
            "platform": _platform,
            "precision": precision_name(_s, _platform, "tljax"),
            "gemm_flops": _gemm_flops,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
    )
