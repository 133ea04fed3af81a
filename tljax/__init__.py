"""tljax: transfer learning in JAX.

Pretrained models as functional Flax (linen) modules with Hugging Face weights at numerical parity
(`tljax.models`), parameter partitions into frozen and trainable groups with per-group learning rates
(`tljax.partition`).
"""

__version__ = "0.1.0"
