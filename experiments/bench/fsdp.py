"""`fsdp`: bytes of params + optimizer state on the fullest device, data parallel vs FSDP."""

from __future__ import annotations

import jax

from experiments.bench.common import emit, setup
from tljax import partition as P
from tljax import rules


def run(quick: bool) -> list[dict]:
    """Bytes of params + AdamW state on the fullest device, full fine-tuning, data parallel vs FSDP: the state is
    built inside jit with output shardings, so under FSDP each device only ever holds its share."""
    from tljax import engine, parallel

    loaded, _, common = setup(quick)
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
