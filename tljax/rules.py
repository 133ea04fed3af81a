"""Ready-made rule sets for `tljax.partition.build`, from the transfer-learning literature.

Each function takes the `Pretrained` that `load_pretrained` returned (the family knows its layer structure) and
returns an ordered `(regex, rule)` list, so a rule set is plain data that can be printed, edited and logged:

    loaded = load_pretrained(path, num_classes=10)
    part = partition.build(loaded.params, rules.llrd(loaded, decay=0.65), learning_rate=1e-4)

With a head attached the backbone lives under `backbone/` and the head under `head/`; rule sets add that prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tljax import tree
from tljax.partition import FROZEN, TRAIN, check_whole, train

RuleList = list[tuple[str, object]]
HEAD = r"^head/"


def _has_head(loaded) -> bool:
    return "head" in loaded.params and "backbone" in loaded.params


def at_backbone(loaded, regex: str) -> str:
    """Anchors a backbone regex below `backbone/` when the model has a head."""
    if _has_head(loaded) and regex.startswith("^"):
        return "^backbone/" + regex[1:]
    return regex


def _head(loaded) -> RuleList:
    return [(HEAD, TRAIN)] if _has_head(loaded) else []


def _depth(loaded) -> int:
    return loaded.family.num_layers(loaded.hf_config)


def _rest(loaded, listed: RuleList, rule) -> RuleList:
    """A catch-all for what the listed rules leave (final norm, pooler, head), only if they leave something: a
    ResNet has nothing above its last stage, and a rule that matches nothing is an error."""
    regexes = [re.compile(rx) for rx, _ in listed]
    left = any(not any(r.search(p) for r in regexes) for p in tree.paths(loaded.params))
    return [(".*", rule)] if left else []


def full(loaded) -> RuleList:
    """Everything trains (full fine-tuning)."""
    return [(".*", TRAIN)]


def linear_probe(loaded) -> RuleList:
    """Only the head trains (feature extraction + linear classifier)."""
    if not _has_head(loaded):
        raise ValueError("linear_probe needs a head: load with num_classes=... or head=...")
    return [(HEAD, TRAIN), (".*", FROZEN)]


def top_k(loaded, k: int, decay: float | None = None) -> RuleList:
    """The head, the top `k` blocks and everything above them (final norm, pooler) train; the rest is frozen.

    `decay` adds discriminative LRs (ULMFiT): block i trains at `decay ** (depth - layer_id)` times the base LR.
    `k` is a whole number (1.0 from a config is 1; 1.5 is an error).
    """
    k = check_whole("top_k: k", k)
    n = _depth(loaded)
    if not 0 <= k <= n:
        raise ValueError(f"top_k needs 0 <= k <= {n} (the model has {n} blocks), got k={k}")
    blocks = loaded.family.block_regex
    rule = (lambda i: TRAIN) if decay is None else (lambda i: train(lr_mult=decay ** (n - i)))
    listed = (
        _head(loaded)
        + [(at_backbone(loaded, blocks(i)), rule(i)) for i in range(n - k, n)]
        + [(at_backbone(loaded, blocks(i)), FROZEN) for i in range(n - k)]
        + [(at_backbone(loaded, loaded.family.STEM_REGEX), FROZEN)]
    )
    return listed + _rest(loaded, listed, TRAIN)


def single(loaded, group: str | int) -> RuleList:
    """Only one group trains: "head", "stem" (embeddings), or block index i (chain-thaw's stages)."""
    if group == "head":
        return linear_probe(loaded)
    if group == "stem":
        return [(at_backbone(loaded, loaded.family.STEM_REGEX), TRAIN), (".*", FROZEN)]
    n = _depth(loaded)
    if not isinstance(group, str):
        group = check_whole("single: group", group)
    if not isinstance(group, int) or not 0 <= group < n:
        raise ValueError(f"single(group=...) takes 'head', 'stem' or a block index in [0, {n}), got {group!r}")
    return [(at_backbone(loaded, loaded.family.block_regex(group)), TRAIN), (".*", FROZEN)]


def surgical(loaded, block: int) -> RuleList:
    """Only block `block` (and the head) trains: surgical fine-tuning (Lee et al., 2023)."""
    block = check_whole("surgical: block", block)
    n = _depth(loaded)
    if not 0 <= block < n:
        raise ValueError(f"surgical block must be in [0, {n}), got {block}")
    return _head(loaded) + [(at_backbone(loaded, loaded.family.block_regex(block)), TRAIN), (".*", FROZEN)]


def bitfit(loaded) -> RuleList:
    """Only biases (and the head) train (BitFit, Ben Zaken et al., 2022)."""
    return _head(loaded) + [(r"bias$", TRAIN), (".*", FROZEN)]


def peft(loaded) -> RuleList:
    """Only the parameters the PEFT methods added (LoRA factors, adapters, prompts) and the head train; the
    pretrained weights stay frozen, so they cost no gradient work and no optimizer state (`tljax.peft.apply`)."""
    from tljax.peft import param_regex

    return _head(loaded) + [(param_regex(loaded), TRAIN), (".*", FROZEN)]


def norm_only(loaded) -> RuleList:
    """Only normalisation layers' scales and biases (and the head) train."""
    return _head(loaded) + [(r"norm/", TRAIN), (".*", FROZEN)]


def embeddings_frozen(loaded) -> RuleList:
    """Everything but the embeddings / stem trains."""
    return [(at_backbone(loaded, loaded.family.STEM_REGEX), FROZEN), (".*", TRAIN)]


def llrd(loaded, decay: float) -> RuleList:
    """Layer-wise LR decay: `lr * decay ** (depth - layer_id)`, stem at layer 0, head and top at depth = n + 1."""
    n = _depth(loaded)
    blocks = [(at_backbone(loaded, loaded.family.block_regex(i)), train(lr_mult=decay ** (n - i))) for i in range(n)]
    listed = blocks + [(at_backbone(loaded, loaded.family.STEM_REGEX), train(lr_mult=decay ** (n + 1)))]
    return listed + _rest(loaded, listed, TRAIN)


def reinitialized(loaded) -> RuleList:
    """Only what `load_pretrained` re-initialised trains (a new head, `reinit=` blocks); everything loaded from the
    checkpoint stays frozen. Transferring the bottom blocks frozen and training fresh ones above them on the new
    task is Yosinski et al. (2014)'s AnB; `full` on the same load is their AnB+."""
    fresh = [p.removeprefix("params/") for p in loaded.report.reinitialized if p.startswith("params/")]
    if not fresh:
        raise ValueError(
            f"nothing in {loaded.report.source} was re-initialised at load, so rule set 'reinitialized' would train "
            "nothing: load with num_classes= (a new head) or reinit=[...] (fresh blocks)"
        )
    return [(f"^{re.escape(p)}$", TRAIN) for p in fresh] + [(".*", FROZEN)]


RULE_SETS: dict[str, Callable[..., RuleList]] = {
    "full": full,
    "linear_probe": linear_probe,
    "top_k": top_k,
    "surgical": surgical,
    "bitfit": bitfit,
    "peft": peft,
    "norm_only": norm_only,
    "single": single,
    "embeddings_frozen": embeddings_frozen,
    "llrd": llrd,
    "reinitialized": reinitialized,
}


def get(name: str, loaded, **kwargs) -> RuleList:
    """A rule set by name (for configs): `get("top_k", loaded, k=2)`."""
    if name not in RULE_SETS:
        raise ValueError(f"unknown rule set {name!r}; choose one of {sorted(RULE_SETS)}")
    return RULE_SETS[name](loaded, **kwargs)
