"""Unsupervised domain adaptation on top of the engine: a labelled source domain, an unlabelled target domain.

    loaded = with_domain_head(loaded, DomainClassifier((1024, 1024)), batch)   # DANN's domain head (domain_head/)
    schedule = train_domain_head(freezing.get("full", loaded, steps=300), loaded)
    data = AdaptationData(source_train_data, target_train_data, schedule.total_steps())
    engine.fit(loaded, schedule, data, config, loss_fn=adaptation_loss("dann"))   # or "mmd", "coral", "source_only"

- `losses`: gradient reversal (custom VJP) and DANN's coefficient schedule, multi-kernel MMD (DAN), CORAL, and
  the loss_fn (source CE + lambda * the method's term; target labels never read).
- `model`: `WithDomainHead` (a `WithHead` with a domain classifier on the reversed pooled features).
- `data`: `AdaptationData` (source rows + target rows per step, `domain` and the schedule's `grl_coeff`).
- `job`: config -> run on a `tljax.data.shift` pair -> source / target test accuracy (experiments/adapt.py).
"""

from .data import AdaptationData, concat_rows
from .losses import (
    METHODS,
    adaptation_loss,
    coral,
    dann_coefficient,
    gradient_reversal,
    masked_coral,
    masked_mmd,
    mmd,
)
from .model import DomainClassifier, WithDomainHead, train_domain_head, with_domain_head

__all__ = ["METHODS", "AdaptationData", "DomainClassifier", "WithDomainHead", "adaptation_loss", "concat_rows",
           "coral", "dann_coefficient", "gradient_reversal", "masked_coral", "masked_mmd", "mmd",
           "train_domain_head", "with_domain_head"]  # fmt: skip
