"""How transferable are features at each depth? Yosinski et al. (2014) on Fashion-MNIST, as one sweep.

    python -m experiments.sweep --config experiments/configs/sweeps/transfer_ab.py --workdir runs/sweeps/transfer_ab
    python -m experiments.sweep --config experiments/configs/sweeps/transfer_ab.py:3 ...   # 3 seeds (default 2)

Stage `pretrain` (runs first, into DIR/pretrain/): the small ResNet of `fashion_mnist_scratch.py` trained from
scratch on the classes of half A and, separately, of half B (one network per half and seed). Then on B, for n = 1..5
transferred units (1: the stem; 2: + stage 0; ...; 5: every stage, a fresh head only), with the units above n
re-initialised (`model.reinit`):
  AnB   the bottom n units of A's network, frozen (`rules: reinitialized`: only the fresh units train)
  AnB+  the same start, everything fine-tuned
  BnB   the bottom n units of B's own network, frozen (the "selffer": no change of task, only co-adaptation lost)
  BnB+  the same, everything fine-tuned
  baseB a fresh network trained on B (n = 0), the reference line
Every run: 300 AdamW steps of 128 images, cosine LR peak 3e-3, the same for pre-training and transfer; the frozen
runs train the top from cached prefix activations (`engine.prefix_cache`), so they cost a fraction of a full run.
Published shape: AnB falls as n grows (features get specific, and co-adaptation breaks in the middle: BnB dips);
AnB+ >= baseB (transfer plus fine-tuning helps). plots/vs_n.png is their Figure 2 for this data.
"""

from tljax import sweep

STEPS = 300
UNITS = 5  # stem + 4 stages
SCRATCH = "experiments/configs/fashion_mnist_scratch.py"
EXPORT = "{sweep_dir}/pretrain/runs/source=%s,seed={axis.seed}/export"
TINY = {"data.train_size": 160, "data.validation_size": 40, "data.test_size": 50, "data.batch_size": 16,
        "data.eval_batch_size": 50, "data.image_size": 16}  # fmt: skip


def lr(steps: int) -> dict:
    return {"schedule": "cosine", "peak": 3e-3, "warmup_steps": steps // 6}


def transfer(source: str, rules: str, steps: int) -> dict:
    """Start from the pre-trained network of `source` (the same seed), train on B with `rules`."""
    phase = {"steps": steps, "rules": rules, "learning_rate": lr(steps), "name": rules}
    return {"model.name": EXPORT % source, "model.config": {}, "schedule.phases": [phase]}


def reinit_above(n: int) -> dict:
    """Keep units 1..n (stem = 1, stage i = i + 2), re-initialise the rest and the head."""
    stem = [] if n >= 1 else [r"^backbone/embedder/"]
    return {"model.reinit": stem + [rf"^backbone/stage_{i}/" for i in range(max(n - 1, 0), UNITS - 1)] + [r"^head/"]}


def get_config(arg=None):
    """`transfer_ab.py:N`: N seeds (default 2); `transfer_ab.py:tiny`: the mechanics only (tests: pre-training on
    A, then AnB and AnB+ at n = 2; 1 seed, 3 steps on 160 images at 16x16)."""
    tiny = arg == "tiny"
    seeds = [0] if tiny else list(range(int(arg) if arg else 2))
    steps, shrink = (3, TINY) if tiny else (STEPS, {})
    pretrain = sweep.config(
        name="pretrain",
        base=f"{SCRATCH}:A",
        overrides={**shrink, "schedule.args": {"steps": steps, "lr": lr(steps)}},
        axes={"source": {"A": {}, "B": {"data.classes": [5, 9, 0, 8, 1]}}, "seed": seeds},
        points=[{"source": "A"}] if tiny else [],
    )
    variants = {
        "AnB": transfer("A", "reinitialized", steps),
        "AnB+": transfer("A", "full", steps),
        "BnB": transfer("B", "reinitialized", steps),
        "BnB+": transfer("B", "full", steps),
        "baseB": transfer("B", "full", steps),
    }
    depths = {str(n): reinit_above(n) for n in range(UNITS + 1)}
    grid = [{"transfer": "baseB", "n": "0"}]
    grid += [{"transfer": t, "n": str(n)} for t in ("AnB", "AnB+", "BnB", "BnB+") for n in range(1, UNITS + 1)]
    if tiny:
        grid = [{"transfer": "AnB", "n": "2"}, {"transfer": "AnB+", "n": "2"}]
    return sweep.config(
        name="transfer_ab",
        base=f"{SCRATCH}:B",
        overrides={**shrink, "engine.prefix_cache.min_blocks": 1},
        axes={"transfer": variants, "n": depths, "seed": seeds},
        points=grid,
        x_axis="n",
        before={"pretrain": pretrain},
    )
