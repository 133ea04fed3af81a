"""`freeze`: what a partition costs. Step time of head-only / top-k / LoRA / full fine-tuning against a forward
pass, the same partitions done the naive way (Adam with learning rate 0 on frozen groups), XLA's FLOP count of each
compiled step, and optimizer-state bytes against trainable bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench.common import emit, setup, time_fn
from tljax import partition as P
from tljax import peft, rules, task
from tljax.losses import model_inputs
from tljax.parallel import compiler_options
from tljax.step import init_state, make_train_step


def _naive(rule_list):
    """The same partition done the naive way: frozen groups become Adam with learning rate 0."""
    return [(rx, P.train(lr=0.0, weight_decay=0.0) if not P.as_rule(r).trainable else r) for rx, r in rule_list]


def _measure_step(loaded, rule_list, batch, reps) -> dict:
    unused = task.unused_params(loaded.model, loaded.params, batch)  # mean pooling: the pooler
    part = P.build(loaded.params, rule_list, learning_rate=1e-4, weight_decay=0.01, unused=unused)
    step = jax.jit(make_train_step(loaded.model, part), donate_argnums=0)
    state = init_state(jax.tree.map(jnp.copy, loaded.params), part.tx)  # the step donates its state
    compiled = step.lower(state, batch).compile(compiler_options=compiler_options())  # as engine.fit does
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


def run(quick: bool) -> list[dict]:
    reps = 3 if quick else 5
    loaded, batch, common = setup(quick)
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
    lora = peft.apply(loaded, [peft.LoRA(rank=8)])  # query/value of every block; the base frozen
    results["lora_r8"] = r = _measure_step(lora, rules.peft(lora), batch, reps)
    out.append(emit("freeze/lora_r8", "step_ms", 1e3 * r["seconds"], flops=r["flops"],
                    trainable_params=r["trainable_params"], opt_state_bytes=r["opt_bytes"], **common))  # fmt: skip
    ratio = r["opt_bytes"] / r["trainable_bytes"]
    out.append(emit("freeze/lora_r8", "opt_state_over_trainable_bytes", ratio, **common))
    out.append(emit("freeze/lora_r8", "time_over_forward", r["seconds"] / fwd_s, **common))
    out.append(emit("freeze/lora_r8", "time_over_full", r["seconds"] / full["seconds"],
                    flop_share=r["flops"] / full["flops"], **common))  # fmt: skip
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
