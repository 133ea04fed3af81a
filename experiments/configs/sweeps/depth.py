"""Fine-tuning from each depth of MiniLM-L6: the default job (LP-FT on WordNet noun definitions, 26 classes) on the
checkpoint cut after block k (`model.num_layers` = k + 1, the deeper blocks dropped), k = 0 ... 5, 3 seeds.

    python -m experiments.sweep --config experiments/configs/sweeps/depth.py --workdir runs/sweeps/depth
    python -m experiments.sweep --config experiments/configs/sweeps/depth.py:1 --workdir runs/sweeps/depth   # 1 seed
    python -m experiments.transferability --finetuned runs/sweeps/depth    # scores vs this sweep's accuracies

The accuracy fine-tuning actually reaches from each layer: what `experiments.transferability` checks its LogME /
H-score / LEEP / NCE ranking of MiniLM's six layers (mean pooling, the default job's) against. Each run is the
default job unchanged but for the depth: 6,400 training definitions, 80 probe + 150 fine-tuning steps, the full
test split. Measured (seeds 0-2, 2-core AMD EPYC, 24 min of runs: 44 s a run at 1 block, 138 s at 6): test accuracy
0.673, 0.727, 0.774, 0.795, 0.803, 0.812 for 1 ... 6 blocks, rising with every block kept, while LogME and the linear
probes peak at block 4 (README, "Transferability").
"""

from tljax import sweep

LAYERS = 6  # MiniLM-L6's blocks


def get_config(arg=None):
    """`depth.py:N` runs seeds 0 .. N-1 (default 3)."""
    if arg is not None and not str(arg).isdigit():
        raise ValueError(f"depth.py:{arg}: the argument is the number of seeds, e.g. depth.py:1")
    seeds = list(range(int(arg) if arg is not None else 3))
    return sweep.config(
        name="depth",
        base="experiments/configs/default.py",
        overrides={"name": "minilm_wordnet_depth"},
        axes={"model.num_layers": list(range(1, LAYERS + 1)), "seed": seeds},
        x_axis="model.num_layers",
    )
