"""BERT-family encoders (BERT, RoBERTa, MiniLM, ...: any `BertConfig`/`RobertaConfig`) as a linen module.

Parameter layout: `embeddings/{word,position,token_type}_embeddings/embedding`, `embeddings/norm`,
`encoder/layer_{i}/{attention/{query,key,value,out},attention_norm,mlp/{fc1,fc2},mlp_norm}`, `pooler/dense`.
`load` lives in `tljax.models.pretrained`; this file owns the family's config mapping and key table.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tljax.models import layers
from tljax.models.convert import HfClassifier, KeyMap, KeyRule, dense_rules, norm_rules
from tljax.models.dropout import Dropout

MODEL_TYPES = ("bert", "roberta")
PREFIXES = ("bert.", "roberta.")  # base-model prefixes of *ForXxx checkpoints
DEFAULT_POOLING = "cls"
STEM_REGEX = r"^embeddings/"  # parameters at depth 0 (below block 0)
# Dropped on purpose and reported: buffers and pretraining heads (MLM / NSP / LM), not part of the backbone.
IGNORE = (r"position_ids$", r"^cls\.", r"^lm_head\.", r"^classifier\.", r"^qa_outputs\.")


class Embeddings(nn.Module):
    """word + token type + position embeddings, then LayerNorm (dropout is applied by the caller)."""

    vocab_size: int
    width: int
    max_positions: int
    type_vocab_size: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        embed = lambda n, name: nn.Embed(
            n,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name=name,
        )
        x = (
            embed(self.vocab_size, "word_embeddings")(input_ids)
            + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
            + embed(self.max_positions, "position_embeddings")(position_ids)
        )
        return nn.LayerNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)


class BertModel(nn.Module):
    """HF `BertModel`/`RobertaModel`: inputs and outputs under HF names; `train=True` enables dropout."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 512
    type_vocab_size: int = 2
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    drop_path_rate: float = 0.0  # stochastic depth of the last layer (`layers.encoder`)
    remat: str = "none"  # gradient checkpointing of each block (`layers.REMAT_POLICIES`)
    attention: str = "eager"  # `layers.ATTENTION`: "eager" or "fused"
    pad_token_id: int = 0
    roberta_positions: bool = False  # RoBERTa counts positions from pad_token_id + 1, skipping padding
    add_pooling_layer: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, *, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, train: bool = False):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            self._check_length(input_ids.shape[-1])
            position_ids = self._positions(input_ids)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Embeddings(
            self.vocab_size,
            self.hidden_size,
            self.max_positions,
            self.type_vocab_size,
            self.eps,
            name="embeddings",
            **kw,
        )(input_ids, token_type_ids, position_ids)
        x = Dropout(self.dropout)(x, deterministic=not train)
        encoder = layers.encoder(
            self.num_layers,
            self.num_heads,
            self.intermediate_size,
            self.act,
            pre_norm=False,
            eps=self.eps,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            drop_path_rate=self.drop_path_rate,
            remat=self.remat,
            attention=self.attention,
            **kw,
        )
        x = encoder(x, layers.padding_mask(attention_mask), train=train)
        out = {"last_hidden_state": x}
        if self.add_pooling_layer:
            out["pooler_output"] = layers.Pooler(self.hidden_size, name="pooler", **kw)(x)
        return out

    def _check_length(self, length: int) -> None:
        """An out-of-range position gather gives NaN silently; say what the limit is instead."""
        limit = self.max_positions - (self.pad_token_id + 1 if self.roberta_positions else 0)
        if length > limit:
            raise ValueError(
                f"sequence length {length} exceeds the model's limit of {limit} tokens (max_position_embeddings="
                f"{self.max_positions}); truncate the inputs (tokenizer truncation=True, max_length={limit})"
            )

    def _positions(self, input_ids):
        if not self.roberta_positions:
            return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=-1) * not_pad + self.pad_token_id


def build(
    hf_config,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    checkpoint_keys=(),
    add_pooling_layer: bool | None = None,
    drop_path_rate: float = 0.0,
    dropout: float | None = None,
    attention_dropout: float | None = None,
    remat: str = "none",
    attention: str = "eager",
) -> BertModel:
    """The linen module for an HF `BertConfig`/`RobertaConfig`.

    Args:
      add_pooling_layer: None means "if the checkpoint has pooler weights".
      drop_path_rate: stochastic depth (per-example residual-branch drop in training), linear over layers from 0 to
        this rate at the last (`layers.encoder`); 0 leaves the model as HF's.
      dropout, attention_dropout: override `hidden_dropout_prob` / `attention_probs_dropout_prob` (None keeps the
        config's); the config itself is not changed.
      remat: gradient checkpointing of each block (`layers.REMAT_POLICIES`: "none", "block", "dots"); same
        outputs and gradients, less activation memory, more compute.
      attention: "eager" (HF's eager attention, the default) or "fused" (`jax.nn.dot_product_attention`: cuDNN's
        flash kernel on a GPU in bf16; no dropout on the attention probabilities, so it needs attention_dropout=0).
    """
    c = hf_config
    layers.check_transformer_config(c)
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={c.position_embedding_type!r} is not supported (absolute only)")
    if add_pooling_layer is None:
        add_pooling_layer = any("pooler." in k for k in checkpoint_keys) or not checkpoint_keys
    attn_rate = layers.rate_option(attention_dropout, c.attention_probs_dropout_prob, "attention_dropout")
    return BertModel(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        max_positions=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        act=c.hidden_act,
        eps=c.layer_norm_eps,
        dropout=layers.rate_option(dropout, c.hidden_dropout_prob, "dropout"),
        attention_dropout=attn_rate,
        drop_path_rate=layers.check_rate(drop_path_rate, "drop_path_rate"),
        remat=layers.check_remat(remat),
        attention=layers.check_attention(attention, attn_rate),
        pad_token_id=c.pad_token_id or 0,
        roberta_positions=c.model_type == "roberta",
        add_pooling_layer=add_pooling_layer,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def dummy_inputs(hf_config) -> dict:
    """Smallest inputs that build every parameter (for `init` / `jax.eval_shape`)."""
    return {"input_ids": np.zeros((1, 2), np.int32)}


num_layers, feature_dim = layers.num_hidden_layers, layers.hidden_size
with_num_layers = layers.with_num_hidden_layers  # truncation: load_pretrained(num_layers=n)
layer_id, block_regex = layers.encoder_layer_id, layers.encoder_block_regex


def key_map(hf_config) -> KeyMap:
    L, P = "encoder.layer.{i}.", "params/encoder/layer_{i}/"
    rules = [
        KeyRule(f"embeddings.{n}.weight", f"params/embeddings/{n}/embedding")
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    rules += norm_rules("embeddings.LayerNorm", "params/embeddings/norm")
    pairs = [
        ("attention.self.query", "attention/query"),
        ("attention.self.key", "attention/key"),
        ("attention.self.value", "attention/value"),
        ("attention.output.dense", "attention/out"),
        ("intermediate.dense", "mlp/fc1"),
        ("output.dense", "mlp/fc2"),
    ]
    for torch_name, flax_name in pairs:
        rules += dense_rules(L + torch_name, P + flax_name)
    rules += norm_rules(L + "attention.output.LayerNorm", P + "attention_norm")
    rules += norm_rules(L + "output.LayerNorm", P + "mlp_norm")
    rules += dense_rules("pooler.dense", "params/pooler/dense")
    return KeyMap(rules)


def classifier(hf_config) -> HfClassifier:
    """BertForSequenceClassification (pooler -> classifier) / RobertaForSequenceClassification (CLS -> dense -> tanh
    -> out_proj; its base model has no pooler)."""
    if hf_config.model_type == "roberta":
        rules = dense_rules("classifier.dense", "params/head/hidden") + dense_rules(
            "classifier.out_proj", "params/head/out"
        )
        return HfClassifier("RobertaForSequenceClassification", "roberta.", "cls", hf_config.hidden_size, tuple(rules))
    return HfClassifier(
        "BertForSequenceClassification", "bert.", "pooler", 0, tuple(dense_rules("classifier", "params/head/out"))
    )
