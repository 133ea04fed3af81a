"""Every key `tljax.job` reads, with its default: `base_config()` (defined in `tljax.job.defaults`, which also tells
a finished run's config.json from one that only predates keys added later at their defaults)."""

from tljax.job.defaults import base_config

__all__ = ["base_config"]
