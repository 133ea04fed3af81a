"""Prompt tuning (Lester et al., 2021) for BERT-family encoders: `length` learned embeddings inserted right after the
first token ([CLS] / <s>), so CLS and pooler features stay at position 0. The prompts get position and token-type
embeddings like any token, every real token attends to them, and their positions are removed from
`last_hidden_state` again, so heads and poolings see the usual (batch, tokens, width) outputs."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from tljax.peft.core import Method, split_backbone

FAMILIES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
    """`length` soft prompt vectors; `init` "vocab" copies randomly drawn rows of the word embedding (Lester et al.'s
    better-performing choice), "normal" draws N(0, 0.02)."""

    KIND = "prompt"
    PARAMS = ("prompt",)
    length: int = 20
    init: str = "vocab"
    target: str = r"embeddings/word_embeddings/embedding$"

    def __post_init__(self):
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"prompt length must be a positive int, got {self.length!r}")
        if self.init not in ("vocab", "normal"):
            raise ValueError(f"prompt init must be 'vocab' or 'normal', got {self.init!r}")

    def resolve(self, shapes, family) -> frozenset:
        if family.__name__.rsplit(".", 1)[-1] != "bert":
            raise ValueError(
                f"prompt tuning supports the BERT-family text encoders ({', '.join(FAMILIES)}), not "
                f"{family.__name__.rsplit('.', 1)[-1]}; use LoRA or adapters for this model"
            )
        inside = split_backbone(shapes)[0]  # the backbone's tables only: PEFT methods adapt the backbone
        tables = {p.removesuffix("/embedding"): s for p, s in inside.items() if p.endswith("/embedding")}
        hits = [m for m in tables if re.search(self.target, m + "/embedding")]
        if len(hits) != 1:
            raise ValueError(f"prompt target {self.target!r} must match one embedding table, matched {hits}")
        return frozenset(hits)

    def inputs(self, inputs: dict) -> dict:
        if inputs.get("position_ids") is not None:
            raise ValueError("prompt tuning computes the positions itself; do not pass position_ids")
        ids = inputs["input_ids"]

        def insert(x, fill):
            middle = jnp.broadcast_to(fill, (x.shape[0], self.length)).astype(x.dtype)
            return jnp.concatenate([x[:, :1], middle, x[:, 1:]], axis=1)

        out = {**inputs, "input_ids": insert(ids, ids[:, :1])}  # placeholders: the first token (never padding)
        if inputs.get("attention_mask") is not None:
            out["attention_mask"] = insert(inputs["attention_mask"], 1)
        if inputs.get("token_type_ids") is not None:
            out["token_type_ids"] = insert(inputs["token_type_ids"], 0)
        return out

    def embed(self, module, ids, y):
        init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * 0.02
        # declared on the embeddings block (nn.Embed is a setup module): `.../embeddings/prompt`, a stem parameter
        prompt = module.parent.param("prompt", init, (self.length, y.shape[-1]), module.param_dtype)
        return y.at[:, 1 : 1 + self.length].set(prompt.astype(y.dtype))

    def outputs(self, outputs: dict) -> dict:
        h = outputs["last_hidden_state"]
        return {**outputs, "last_hidden_state": jnp.concatenate([h[:, :1], h[:, 1 + self.length :]], axis=1)}

    def initialise(self, new, base, key):
        if self.init != "vocab":
            return new
        out = {}
        for path in new:
            table = base[next(iter(self.modules)) + "/embedding"]
            rows = jax.random.randint(key, (self.length,), 0, table.shape[0])
            out[path] = jnp.asarray(table)[rows]
        return out
