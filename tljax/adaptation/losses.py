"""Domain-adaptation objectives: the gradient reversal layer and its schedule, MMD, CORAL, and the loss_fn.

    loss_fn = adaptation_loss("dann", weight=1.0)      # engine.fit(..., loss_fn=loss_fn)
    mmd(source_features, target_features)              # multi-kernel Gaussian MMD^2 (DAN)
    coral(source_features, target_features)            # ||C_s - C_t||_F^2 / (4 d^2)

A batch holds labelled source rows and unlabelled target rows in any order: `domain` (B,) is 0 for source, 1 for
target, and the classification loss reads the source rows only (target rows' `labels` are placeholders). Every
estimator here weights rows by that mask instead of slicing, so it is jit-safe and does not care how the rows are
laid out or sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

METHODS = ("source_only", "dann", "mmd", "coral")


# ---- gradient reversal (Ganin & Lempitsky 2015) -------------------------------------------------------------------


@jax.custom_vjp
def _reverse(x, coeff):
    return x


def _reverse_fwd(x, coeff):
    return x, coeff


def _reverse_bwd(coeff, g):
    return (-coeff * g).astype(g.dtype), jnp.zeros_like(coeff)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x: jax.Array, coeff) -> jax.Array:
    """Identity forward; backward multiplies the incoming gradient by `-coeff`. `coeff` receives no gradient.

    Args:
      x: features (B, ...).
      coeff: a scalar, or one value per row (B,) (a batch carries the schedule's value on every row).
    """
    c = jax.lax.stop_gradient(jnp.asarray(coeff, x.dtype))
    if c.ndim > x.ndim:
        raise ValueError(f"gradient_reversal: coeff has shape {c.shape}, more axes than x {x.shape}")
    return _reverse(x, c.reshape(c.shape + (1,) * (x.ndim - c.ndim)))


def dann_coefficient(progress, gamma: float = 10.0) -> jax.Array:
    """DANN's reversal coefficient 2 / (1 + exp(-gamma p)) - 1: 0 at the start (the domain classifier's noisy early
    gradients do not disturb the features), -> 1 as training progress p goes 0 -> 1. p is clipped to [0, 1]."""
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0


# ---- discrepancies ------------------------------------------------------------------------------------------------


def _both_domains(is_target) -> jax.Array:
    """Whether the batch has source and target rows: without both there is no discrepancy to measure (0), rather
    than one domain's spread, which the loss would then shrink."""
    t = jnp.asarray(is_target).astype(jnp.float32)
    return (t.sum() > 0) & ((1.0 - t).sum() > 0)


def _signed_weights(is_target) -> jax.Array:
    """+1/n_s on source rows, -1/n_t on target rows (w^T K w is then the MMD^2 V-statistic)."""
    t = jnp.asarray(is_target).astype(jnp.float32)
    n_t, n_s = jnp.maximum(t.sum(), 1.0), jnp.maximum((1.0 - t).sum(), 1.0)
    return (1.0 - t) / n_s - t / n_t


def squared_distances(x: jax.Array) -> jax.Array:
    """(N, N) squared Euclidean distances between rows (clipped at 0 against round-off)."""
    sq = (x * x).sum(-1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def masked_mmd(features, is_target, *, kernels: int = 5, kernel_mul: float = 2.0, bandwidth=None) -> jax.Array:
    """Biased (V-statistic, Gretton et al. 2012's MMD^2_b) multi-kernel Gaussian MMD^2 between the rows with
    `is_target` 0 and those with 1, as in DAN (Long et al. 2015): k = sum_i exp(-||x - y||^2 / (s * mul^i)) for
    i = -(kernels // 2) ... , with s the mean squared distance over distinct pairs of the pooled rows (under
    stop_gradient: the features must not shrink the bandwidth to win), unless `bandwidth` gives s.

    0 when the batch lacks one domain. The biased estimate is >= 0 and includes the k(x, x) terms; with a few dozen
    rows per domain its bias is small beside the batch-to-batch noise, and it never goes negative (the unbiased one
    does, which makes a poor loss).
    """
    x = jnp.asarray(features, jnp.float32)
    d2 = squared_distances(x)
    n = x.shape[0]
    s = jax.lax.stop_gradient(d2.sum() / max(n * n - n, 1)) if bandwidth is None else jnp.float32(bandwidth)
    scales = kernel_mul ** (jnp.arange(kernels, dtype=jnp.float32) - kernels // 2)
    k = jnp.exp(-d2[None] / (s * scales)[:, None, None]).sum(0)
    w = _signed_weights(is_target)
    return jnp.where(_both_domains(is_target), w @ k @ w, 0.0)


def _covariance(x: jax.Array, rows: jax.Array) -> jax.Array:
    """Unbiased covariance (n - 1 denominator, as Sun & Saenko) of the rows where `rows` is 1."""
    n = rows.sum()
    centred = (x - (rows[:, None] * x).sum(0) / jnp.maximum(n, 1.0)) * rows[:, None]
    return centred.T @ centred / jnp.maximum(n - 1.0, 1.0)


def masked_coral(features, is_target) -> jax.Array:
    """Deep CORAL (Sun & Saenko 2016): ||C_s - C_t||_F^2 / (4 d^2) between the covariances of source and target
    rows (0 when the batch lacks one domain)."""
    x = jnp.asarray(features, jnp.float32)
    t = jnp.asarray(is_target).astype(jnp.float32)
    diff = _covariance(x, 1.0 - t) - _covariance(x, t)
    return jnp.where(_both_domains(t), (diff * diff).sum() / (4.0 * x.shape[-1] ** 2), 0.0)


def _stacked(source, target):
    if not (len(source) and len(target)):
        raise ValueError(f"a discrepancy needs rows from both domains, got {len(source)} source, {len(target)} target")
    x = jnp.concatenate([jnp.asarray(source), jnp.asarray(target)])
    return x, jnp.concatenate([jnp.zeros(len(source)), jnp.ones(len(target))])


def mmd(source, target, **kwargs) -> jax.Array:
    """`masked_mmd` between two feature arrays (n_s, d) and (n_t, d)."""
    return masked_mmd(*_stacked(source, target), **kwargs)


def coral(source, target) -> jax.Array:
    """`masked_coral` between two feature arrays (n_s, d) and (n_t, d)."""
    return masked_coral(*_stacked(source, target))


# ---- the loss -----------------------------------------------------------------------------------------------------


def source_classification(outputs: Mapping, batch: Mapping) -> tuple[jax.Array, dict]:
    """Cross-entropy and accuracy over the source rows (`domain` 0) only."""
    source = (batch["domain"] == 0).astype(jnp.float32)
    n = jnp.maximum(source.sum(), 1.0)
    logits, labels = outputs["logits"].astype(jnp.float32), batch["labels"]
    ce = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * source).sum() / n
    accuracy = ((logits.argmax(-1) == labels) * source).sum() / n
    return ce, {"source_ce": ce, "accuracy": accuracy}


def domain_classification(outputs: Mapping, batch: Mapping) -> tuple[jax.Array, dict]:
    """Binary cross-entropy of the domain head (through the reversal layer) and its accuracy, over all rows."""
    if "domain_logits" not in outputs:
        raise ValueError("dann needs the model's domain_logits: wrap the model with adaptation.with_domain_head")
    if "grl_coeff" not in batch:
        raise ValueError("dann needs the batch's grl_coeff (the reversal schedule): build batches with AdaptationData")
    logits, domain = outputs["domain_logits"].astype(jnp.float32), batch["domain"].astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, domain).mean()
    accuracy = ((logits > 0) == (domain > 0.5)).mean()
    return bce, {"domain_loss": bce, "domain_accuracy": accuracy, "grl_coeff": batch["grl_coeff"].mean()}


def adaptation_loss(method: str, weight: float = 1.0, *, kernels: int = 5, kernel_mul: float = 2.0) -> Callable:
    """`loss_fn(outputs, batch) -> (loss, metrics)` for `engine.fit`: source CE + weight * the method's term.

    Args:
      method: "source_only" (CE only), "dann" (domain BCE through the reversal layer), "mmd" or "coral" (between the
        source and target rows of the pooled `features`).
      weight: the adaptation term's weight (lambda); must be >= 0.
      kernels, kernel_mul: the MMD kernel family (see `masked_mmd`).
    Metrics: loss, source_ce, accuracy (source rows) and domain_loss / domain_accuracy / grl_coeff (dann) or
    discrepancy (mmd, coral).
    """
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; choose one of {METHODS}")
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not weight >= 0:
        raise ValueError(f"adaptation weight must be a number >= 0, got {weight!r}")
    discrepancy = {"mmd": lambda f, t: masked_mmd(f, t, kernels=kernels, kernel_mul=kernel_mul),
                   "coral": masked_coral}.get(method)  # fmt: skip

    def loss_fn(outputs: Mapping, batch: Mapping):
        if "domain" not in batch:
            raise ValueError("adaptation batches need `domain` (0 source, 1 target): build them with AdaptationData")
        ce, metrics = source_classification(outputs, batch)
        if method == "source_only":
            return ce, {**metrics, "loss": ce}
        if method == "dann":
            term, extra = domain_classification(outputs, batch)
        else:
            term = discrepancy(outputs["features"], batch["domain"])
            extra = {"discrepancy": term}
        loss = ce + weight * term
        return loss, {**metrics, **extra, "loss": loss}

    return loss_fn
