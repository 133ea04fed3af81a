"""`profile`: where a training step's time goes, by kind of operation, from a `jax.profiler` trace (XLA:CPU).

Traces a few steps of a `bench peer` model (full fine-tuning, AdamW, dropout on, after warm-up) and reads the
Perfetto trace: each executed operation's exclusive time on XLA's compute threads, summed by kind:

  matmul       dots (XLA:CPU runs them as `ynn_fusion`, YNNPACK; `onednn_fusion` or `xnn_fusion` where XLA_FLAGS
               hands them to oneDNN or XNNPACK; or `dot`/`dot_general`) and convolutions; a library fusion that
               computes no product (YNNPACK also runs reductions and exponentials) is elementwise
  elementwise  every other fusion: norms, activations, softmax, dropout masks, the optimizer update
  layout       copies and transposes
  collective   all-reduce, all-gather, reduce-scatter and the waits at the rendezvous between devices
  runtime      the thunk executor's own time between operations

Rows per kind: ms per step (summed over the compute threads) and its share of the traced time. Then `busy`, the
traced time over (compute threads x step time), so the threads' idle share is 1 - busy (helper work inside an
operation that XLA:CPU splits over its pool is charged to the operation's own thread, so one device understates
it); `cpu_time_over_cores_x_wall`, the process's CPU time over the cores' time while tracing (the OS's view, where
a pool's spin-waiting counts as busy); with one device per compute thread, `matmul_flops_per_s`, the threads'
combined rate inside matmuls (XLA's FLOPs per step over the matmul time per thread, comparable with `bench mfu`'s
peak; with fewer devices than threads the pool's untraced helpers would inflate it); the operations that took most
time (`op_ms`, by XLA name); and the sources that took most time (`source_ms`: each operation's `op_name` from the
compiled program, `forward/` or `backward/` plus the module path with layer numbers folded, e.g.
`forward/backbone/encoder/layer_*/mlp/erfc`, `step/` for the optimizer update): what to change in the model. The
trace stays in --trace_dir for TensorBoard or ui.perfetto.dev.

    python -m experiments.bench profile                                    # real MiniLM-L6, 32 x 128
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.bench profile --jax_devices 2
    python -m experiments.bench profile --quick

The operation names are XLA:CPU's: on an accelerator the command writes the trace and the step time and leaves the
breakdown to the profiler's own viewer.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import statistics
import time
from pathlib import Path

import jax

from experiments.bench import mfu, peer
from experiments.bench.common import emit, host_cpu, scratch_dir
from tljax.parallel import host_cores

KINDS = ("matmul", "elementwise", "layout", "collective", "runtime")
COMPUTE_THREAD = "XLAEigen"  # XLA:CPU's intra-op pool: the threads that run a program's operations
_RUNTIME = ("ThunkExecutor", "SlinkyThreadPool")
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|Rendezvous|Wait)")
_MATMUL = re.compile(r"^(ynn_fusion|onednn_fusion|xnn_fusion|dot|convolution|.*gemm)")
_LAYOUT = re.compile(r"^(copy|transpose)")
_ASYNC_END = re.compile(r"^end: ")  # the completion part of an operation XLA:CPU ran asynchronously: `end: copy.5`


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")


def kind(name: str, hlo: dict | None = None) -> str:
    """An operation's kind from its XLA:CPU name; with `hlo` (`hlo_ops`), a matmul-named fusion that computes no
    product (XLA:CPU also hands reductions and exponentials to YNNPACK as `ynn_fusion`) counts as elementwise."""
    if name.startswith(_RUNTIME):
        return "runtime"
    if _COLLECTIVE.match(name):
        return "collective"
    if _MATMUL.match(name):
        op = (hlo or {}).get(name)
        return "elementwise" if op is not None and not op["products"] else "matmul"
    return "layout" if _LAYOUT.match(name) else "elementwise"


def source(op_name: str) -> str:
    """Where in the program an operation comes from, from its `op_name` metadata: `forward/` or `backward/` and the
    module path with layer numbers and platform branches folded (`forward/backbone/encoder/layer_*/mlp/erfc`);
    `step/` for what is outside the model's differentiation (the optimizer update, the loss bookkeeping). A combined
    operation (XLA merges the gradients' all-reduces: `(a:b:c)`) is named by its first part and a count of the
    rest."""
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    parts = name[1:-1].split(":") if name.startswith("(") and name.endswith(")") else [name]
    if len(parts) > 1:
        return f"{source(parts[0])} (+{len(parts) - 1} more)"
    first = re.sub(r"layer_\d+", "layer_*", name.split(";")[0])  # fused ops list each origin: the first names it
    first = re.sub(r"/cond/branch_\d+_fun", "", first)  # `lax.platform_dependent`'s branch (one is compiled)
    for prefix, label in ((r"^transpose\(jvp\([^)]*\)\)/", "backward/"), (r"^jvp\([^)]*\)/", "forward/")):
        if re.match(prefix, first):
            return re.sub(prefix, label, first)
    return "step/" + first


def hlo_ops(text: str) -> dict[str, dict]:
    """{instruction name: {"products": whether it computes a dot or convolution (for a fusion: its fused
    computation does), "source": `source` of its metadata, "shape"}} of a compiled module's HLO text
    (`compiled.as_text()`), whose names are the ones a trace shows."""
    computations, current = collections.defaultdict(set), None
    instructions = {}
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        computations[current].add(opcode)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instructions[name] = (opcode, calls.group(1) if calls else None, shape, op_name.group(1) if op_name else "")
    products = {"dot", "convolution"}
    return {
        name: {"products": opcode in products or bool(called and computations.get(called, set()) & products),
               "source": source(op_name) if op_name else name, "shape": shape}
        for name, (opcode, called, shape, op_name) in instructions.items()
    }  # fmt: skip


def exclusive_times(trace: dict) -> tuple[dict[str, float], int]:
    """({operation name: exclusive µs summed over the compute threads}, number of compute threads) of a Perfetto
    trace: an event's duration minus its children's on the same thread (the executor's span holds the ops)."""
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    by_thread = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and COMPUTE_THREAD in names.get(e.get("tid"), ""):
            by_thread[e["tid"]].append(e)
    out = collections.defaultdict(float)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ = []  # [end, name, exclusive µs] of the enclosing events
        for e in events:
            while open_ and open_[-1][0] <= e["ts"]:
                _, name, excl = open_.pop()
                out[name] += excl
            if open_:
                open_[-1][2] -= e["dur"]
            open_.append([e["ts"] + e["dur"], e["name"], e["dur"]])
        for _, name, excl in open_:
            out[name] += excl
    return dict(out), len(by_thread)


def breakdown(trace: dict, steps: int, step_s: float, hlo: dict | None = None) -> dict:
    """ms per step by kind, by operation ((kind, name) pairs, numbered names merged: `ynn_fusion.12` ->
    `ynn_fusion`) and, with `hlo` (`hlo_ops` of the traced program), by source ((kind, `source`) pairs: what in the
    model the time is for); the traced share of each kind and the compute threads' busy fraction."""
    times, threads = exclusive_times(trace)
    if not threads:
        raise ValueError(f"the trace has no {COMPUTE_THREAD} threads: not an XLA:CPU trace")
    ops, kinds = collections.defaultdict(float), dict.fromkeys(KINDS, 0.0)
    sources = collections.defaultdict(float)
    for traced, us in times.items():
        name = _ASYNC_END.sub("", traced)  # charged to its operation
        ms, k, base = us / steps / 1e3, kind(name, hlo), re.sub(r"\.\d+$", "", name)
        ops[(k, base)] += ms
        kinds[k] += ms
        if hlo is not None:
            sources[(k, hlo[name]["source"] if name in hlo else base)] += ms
    total = sum(kinds.values())
    by_time = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))
    return {
        "kinds_ms": kinds,
        "shares": {k: v / total for k, v in kinds.items()},
        "threads": threads,
        "busy": total / (threads * step_s * 1e3),
        "ops_ms": by_time(ops),
        "sources_ms": by_time(sources),
    }


def read_trace(folder: str | Path) -> dict:
    files = sorted(Path(folder).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
    with gzip.open(files[-1]) as f:
        return json.load(f)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help=f"one of {sorted(peer.MODELS)} (default minilm; --quick: "
                        "tiny-bert)")  # fmt: skip
    parser.add_argument("--jax_devices", type=int, default=1, help="data parallel over N devices (CPU: fake ones)")
    parser.add_argument("--parallel", default="data", choices=("data", "fsdp"), help="the engine's mode")
    parser.add_argument("--seq", type=int, default=None, help="sequence length of a text model (default: its 128)")
    parser.add_argument("--steps", type=int, default=None, help="traced steps (default 3; --quick: 2)")
    parser.add_argument("--trace_dir", default=None, help="where the trace stays (default: a temp dir, removed)")
    parser.add_argument("--top", type=int, default=12, help="operations listed by time")
    peer.add_precision_argument(parser)


def run(
    quick: bool,
    model=None,
    jax_devices=1,
    parallel="data",
    seq=None,
    steps=None,
    trace_dir=None,
    top=12,
    precision="auto",
    attention="eager",
):
    name = model or ("tiny-bert" if quick else "minilm")
    steps = steps or (2 if quick else 3)
    mfu.check_devices(jax_devices)
    s = peer.checkpoints([name], scratch_dir("tljax-profile-"), precision, attention)[name]
    loaded = peer.jax_load(s)
    if seq is not None:
        longest = getattr(loaded.hf_config, "max_position_embeddings", 0) if s["kind"] == "text" else 0
        if not 1 <= seq <= longest:
            raise ValueError(f"--seq {seq}: a text model's length, 1 to its {longest} position embeddings")
        s = {**s, "seq": seq}
    local = peer.make_batch(s)
    compiled, state, batch = peer.jax_placed_step(loaded, "full", local, jax_devices, parallel)
    flops = mfu.model_flops(s, local)
    hlo = hlo_ops(compiled.prepare(state, batch).as_text())

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])

    for _ in range(2):
        step()
    folder = trace_dir or scratch_dir("tljax-trace-")
    seconds, cpu = [], time.process_time()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    step_s = statistics.median(seconds)
    device = jax.devices()[0]
    common = {"model": name, "batch": s["batch"], "seq": s.get("seq"), "jax_devices": jax_devices, "parallel": parallel,
              "platform": device.platform, "device": device.device_kind, "host_cpu": host_cpu(), "steps": steps,
              "precision": precision, "attention": attention}  # fmt: skip
    where = f"profile/{name}/full"
    rows = [emit(where, "step_ms", 1e3 * step_s, trace_dir=str(folder) if trace_dir else None, **common)]
    if device.platform != "cpu":
        print(f"# {device.platform}: the breakdown reads XLA:CPU operation names; open the trace in TensorBoard")
        return rows
    b = breakdown(read_trace(folder), steps, step_s, hlo)
    for k in KINDS:
        rows.append(emit(where, f"{k}_ms", b["kinds_ms"][k], share=b["shares"][k], **common))
    rows.append(emit(where, "busy", b["busy"], threads=b["threads"], **common))
    cores = host_cores()
    rows.append(emit(where, "cpu_time_over_cores_x_wall", cpu / (cores * sum(seconds)), cores=cores, **common))
    if jax_devices == b["threads"] and b["kinds_ms"]["matmul"]:  # each device's operations on a thread of its own
        matmul_s = b["kinds_ms"]["matmul"] / b["threads"] / 1e3
        rows.append(emit(where, "matmul_flops_per_s", flops / matmul_s, xla_flops_per_step=flops, **common))
    for (k, op), ms in list(b["ops_ms"].items())[:top]:
        rows.append(emit(f"{where}/{k}/{op}", "op_ms", ms, kind=k, **common))
    for (k, where_from), ms in list(b["sources_ms"].items())[:top]:
        rows.append(emit(f"{where}/{k}/{where_from}", "source_ms", ms, kind=k, **common))
    return rows
