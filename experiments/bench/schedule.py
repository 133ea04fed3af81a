"""`schedule`: gradual unfreezing on MiniLM, step and compile time per phase (cold and with the cache warm)."""

from __future__ import annotations

from experiments.bench.common import emit, scratch_dir, setup


def run(quick: bool) -> list[dict]:
    """Gradual unfreezing (ULMFiT) on MiniLM: compile and step time per phase, cold and with the persistent
    compilation cache warm (the second run of the same ablation)."""
    import itertools

    from tljax import engine, freezing

    steps = 2 if quick else 3
    engine.enable_compilation_cache(scratch_dir("tljax-cache-"))
    loaded, batch, common = setup(quick)
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
