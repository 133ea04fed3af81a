"""tljax: transfer learning in JAX.

Pretrained models as functional Flax (linen) modules with Hugging Face weights at numerical parity
(`tljax.models`), parameter partitions into frozen and trainable groups with per-group learning rates
(`tljax.partition`, `tljax.rules`), freezing schedules resolved into plans (`tljax.freezing`), the training step
(`tljax.step`) and the one training loop (`tljax.engine`), evaluation (`tljax.evaluation`).
"""

__version__ = "0.1.0"
