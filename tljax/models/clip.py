"""CLIP (HF `CLIPModel`, model_type "clip") and its vision tower alone ("clip_vision_model") as a linen module.

Parameter layout:
  vision/embeddings/{class_embedding,patch_embedding/kernel,position_embedding/embedding}, vision/pre_norm,
  vision/encoder/layer_{i}/{attention/{query,key,value,out},attention_norm,mlp/{fc1,fc2},mlp_norm}, vision/post_norm,
  text/embeddings/{token_embedding,position_embedding}/embedding, text/encoder/layer_{i}/..., text/final_norm,
  visual_projection/kernel, text_projection/kernel, logit_scale.

Either tower may be called alone (image-only features for a linear probe, text-only class prompts for zero-shot);
`init` with `dummy_inputs` builds both. "clip_vision_model" checkpoints (`CLIPVisionModel`,
`CLIPVisionModelWithProjection`) build the vision tower only, with `visual_projection` when the checkpoint has it.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tljax.models import layers
from tljax.models.convert import CONV, LINEAR, KeyMap, KeyRule, dense_rules, norm_rules
from tljax.models.vit import check_image_size, resample_table

MODEL_TYPES = ("clip", "clip_vision_model")
PREFIXES = ()  # CLIPModel / CLIPVisionModel keys already start at text_model. / vision_model.
DEFAULT_POOLING = "image_embeds"
STEM_REGEX = r"^vision/(embeddings|pre_norm)/"  # depth 0 of the vision tower
# Dropped on purpose and reported: the position_ids buffers older checkpoints carry.
IGNORE = (r"position_ids$",)
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: EOS is the largest id in the row


def _encoder(tower, train: bool, x, mask=None):
    """The tower's pre-norm encoder (`encoder/layer_{i}`); called inside a tower's compact `__call__`."""
    encoder = layers.encoder(
        tower.num_layers,
        tower.num_heads,
        tower.mlp_dim,
        tower.act,
        pre_norm=True,
        eps=tower.eps,
        dropout=tower.dropout,
        attention_dropout=tower.attention_dropout,
        drop_path_rate=tower.drop_path_rate,
        remat=tower.remat,
        attention=tower.attention,
        dtype=tower.dtype,
        param_dtype=tower.param_dtype,
    )
    return encoder(x, mask, train=train)


def _norm(tower, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(tower.eps, dtype=tower.dtype, param_dtype=tower.param_dtype, name=name)


def _embed(n: int, width: int, name: str, dtype, param_dtype) -> nn.Embed:
    return nn.Embed(
        n, width, dtype=dtype, param_dtype=param_dtype, embedding_init=nn.initializers.normal(0.02), name=name
    )


class VisionEmbeddings(nn.Module):
    """[class token; bias-free conv patches] + learned positions (HF `CLIPVisionEmbeddings`)."""

    width: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        n, c, h, w = pixel_values.shape
        if (c, h, w) != (self.num_channels, self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values of shape (C, H, W)={(c, h, w)} do not match the model's "
                f"{(self.num_channels, self.image_size, self.image_size)} (NCHW, as HF processors emit)"
            )
        p = self.patch_size
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NCHW -> NHWC once, here
        patches = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embedding",
        )(x).reshape(n, -1, self.width)
        cls = self.param("class_embedding", nn.initializers.normal(self.width**-0.5), (self.width,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.width)), patches], axis=1)
        positions = _embed(x.shape[1], self.width, "position_embedding", self.dtype, self.param_dtype)
        return x + positions(jnp.arange(x.shape[1]))[None]


class VisionTower(nn.Module):
    """HF `CLIPVisionTransformer`: embeddings, pre_norm, pre-norm encoder; pooled = post_norm(CLS)."""

    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    act: str = "quick_gelu"
    eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0  # on the residual branches; HF's CLIP has none
    drop_path_rate: float = 0.0  # stochastic depth of the last layer (`layers.encoder`)
    remat: str = "none"  # gradient checkpointing of each block (`layers.REMAT_POLICIES`)
    attention: str = "eager"  # `layers.ATTENTION`: "eager" or "fused"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, *, train: bool = False):
        """Returns (last_hidden_state, pooler_output); the hidden states are not post-normed, as in HF."""
        x = VisionEmbeddings(
            self.width,
            self.image_size,
            self.patch_size,
            self.num_channels,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embeddings",
        )(pixel_values)
        x = _encoder(self, train, _norm(self, "pre_norm")(x))
        return x, _norm(self, "post_norm")(x[:, 0])


class TextEmbeddings(nn.Module):
    """token + learned position embeddings (HF `CLIPTextEmbeddings`; no LayerNorm, no token types)."""

    vocab_size: int
    width: int
    max_positions: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids):
        embed = functools.partial(_embed, width=self.width, dtype=self.dtype, param_dtype=self.param_dtype)
        return embed(self.vocab_size, name="token_embedding")(input_ids) + embed(
            self.max_positions, name="position_embedding"
        )(position_ids)


class TextTower(nn.Module):
    """HF `CLIPTextTransformer`: token + position embeddings, causal encoder, final_norm; pooled = EOS state."""

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int = 77
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    act: str = "quick_gelu"
    eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0  # on the residual branches; HF's CLIP has none
    drop_path_rate: float = 0.0  # stochastic depth of the last layer (`layers.encoder`)
    remat: str = "none"  # gradient checkpointing of each block (`layers.REMAT_POLICIES`)
    attention: str = "eager"  # `layers.ATTENTION`: "eager" or "fused"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, train: bool = False):
        """Returns (last_hidden_state, pooler_output)."""
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={self.max_positions}")
        if position_ids is None:
            position_ids = jnp.arange(length)[None]
        x = TextEmbeddings(
            self.vocab_size,
            self.width,
            self.max_positions,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embeddings",
        )(input_ids, position_ids)
        x = _norm(self, "final_norm")(_encoder(self, train, x, text_mask(attention_mask, length)))
        return x, x[jnp.arange(x.shape[0]), self.eos_index(input_ids)]

    def eos_index(self, input_ids):
        """Where the pooled state is read, exactly as HF `CLIPTextTransformer` chooses it.

        Legacy configs (eos_token_id == 2, before transformers PR #24773) take the largest id in the row (the
        original EOT token is the largest in CLIP's vocabulary); newer ones take the first `eos_token_id`
        (padding may repeat it). A row without EOS pools position 0, as HF's argmax over all-False does.
        """
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)


def text_mask(attention_mask, length: int):
    """Causal mask combined with the 0/1 padding mask: boolean (batch or 1, 1, length, length)."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is None:
        return causal
    return causal & layers.padding_mask(attention_mask)


def l2_normalize(x):
    """x / ||x||_2 over the last axis (HF `_get_vector_norm`: no epsilon, so a zero vector gives NaN like HF)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nn.Module):
    """HF `CLIPModel` (or `CLIPVisionModel[WithProjection]` when `text` is None); inputs under HF names.

    Outputs: "image_embeds"/"text_embeds" (projected, L2-normalised as `CLIPModel` returns them),
    "logits_per_image"/"logits_per_text" (both towers called), "{vision,text}_last_hidden_state",
    "{vision,text}_pooler_output" (before projection), and "last_hidden_state"/"pooler_output" aliasing the vision
    tower when `pixel_values` are given, else the text tower, so generic heads and poolings work.
    """

    vision: VisionTower
    text: TextTower | None = None  # None: vision tower alone ("clip_vision_model")
    projection_dim: int | None = 512  # None: no visual_projection (plain `CLIPVisionModel`)
    logit_scale_init: float = 2.6592  # log(1 / 0.07), HF's `logit_scale_init_value`
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, *, input_ids=None, attention_mask=None, pixel_values=None, position_ids=None, train: bool = False
    ):
        if input_ids is None and pixel_values is None:
            raise ValueError("CLIP needs input_ids (text), pixel_values (images) or both")
        out = {}
        if input_ids is not None:
            out.update(self._text(input_ids, attention_mask, position_ids, train))
        if pixel_values is not None:
            out.update(self._vision(pixel_values, train))
        if input_ids is not None and pixel_values is not None:
            scale = jnp.exp(
                self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (), self.param_dtype).astype(
                    self.dtype
                )
            )
            out["logits_per_text"] = scale * out["text_embeds"] @ out["image_embeds"].T
            out["logits_per_image"] = out["logits_per_text"].T
        tower = "vision" if pixel_values is not None else "text"
        out["last_hidden_state"], out["pooler_output"] = (
            out[f"{tower}_last_hidden_state"],
            out[f"{tower}_pooler_output"],
        )
        return out

    def _projection(self, name: str, pooled):
        dense = nn.Dense(
            self.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(pooled.shape[-1] ** -0.5),
            name=name,
        )
        return l2_normalize(dense(pooled))

    def _text(self, input_ids, attention_mask, position_ids, train):
        if self.text is None:
            raise ValueError("this checkpoint has no text tower (clip_vision_model); call with pixel_values only")
        hidden, pooled = self.text(input_ids, attention_mask, position_ids, train=train)
        return {
            "text_last_hidden_state": hidden,
            "text_pooler_output": pooled,
            "text_embeds": self._projection("text_projection", pooled),
        }

    def _vision(self, pixel_values, train):
        hidden, pooled = self.vision(pixel_values, train=train)
        out = {"vision_last_hidden_state": hidden, "vision_pooler_output": pooled}
        if self.projection_dim is not None:
            out["image_embeds"] = self._projection("visual_projection", pooled)
        return out


def zero_shot_classifier(text_embeds):
    """Class weights for zero-shot classification from prompt embeddings (CLIP's prompt ensembling).

    Args:
      text_embeds: (classes, dim) or (classes, templates, dim) text embeddings, e.g. `text_embeds` of the prompts
        "a photo of a {label}." for each class and template.
    Returns:
      (classes, dim) unit vectors: each class's template embeddings normalised, averaged, normalised again.
    """
    text_embeds = jnp.asarray(text_embeds)
    if text_embeds.ndim == 3:
        text_embeds = l2_normalize(text_embeds).mean(axis=1)
    return l2_normalize(text_embeds)


def zero_shot_logits(image_embeds, class_text_embeds, logit_scale):
    """Image-to-class logits, `CLIPModel`'s `logits_per_image` against a fixed set of class embeddings.

    Args:
      image_embeds: (batch, dim) image embeddings (normalised here, so raw projections also work).
      class_text_embeds: (classes, dim), e.g. from `zero_shot_classifier`.
      logit_scale: the model's stored log-scale, `params["logit_scale"]` (exponentiated here, as in HF).
    Returns:
      (batch, classes) logits; their argmax is the zero-shot prediction.
    """
    return jnp.exp(logit_scale) * l2_normalize(image_embeds) @ l2_normalize(class_text_embeds).T


def _vision_config(hf_config):
    return hf_config.vision_config if hf_config.model_type == "clip" else hf_config


def _square(value, name: str) -> int:
    """HF allows int or (h, w) sizes; CLIP's position table is square, so (h, w) must agree."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"{name}={value!r} is not supported (square sizes only)")


def _tower_options(
    c, dropout=None, attention_dropout=None, drop_path_rate: float = 0.0, remat: str = "none", attention: str = "eager"
) -> dict:
    """A tower's fields from its config and the `build` options (see `build`)."""
    attn_rate = layers.rate_option(attention_dropout, c.attention_dropout, "attention_dropout")
    return dict(
        width=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        act=c.hidden_act,
        eps=c.layer_norm_eps,
        attention_dropout=attn_rate,
        dropout=layers.rate_option(dropout, 0.0, "dropout"),  # not c.dropout: transformers' CLIP never applies it
        drop_path_rate=layers.check_rate(drop_path_rate, "drop_path_rate"),
        remat=layers.check_remat(remat),
        attention=layers.check_attention(attention, attn_rate),
    )


def _vision_tower(c, rates: dict, **kw) -> VisionTower:
    layers.check_transformer_config(c, "vision_config")
    return VisionTower(
        image_size=_square(c.image_size, "image_size"),
        patch_size=_square(c.patch_size, "patch_size"),
        num_channels=c.num_channels,
        **_tower_options(c, **rates),
        **kw,
    )


def _text_tower(c, rates: dict, **kw) -> TextTower:
    layers.check_transformer_config(c, "text_config")
    if not isinstance(c.eos_token_id, int):
        raise ValueError(
            f"text_config.eos_token_id={c.eos_token_id!r} is not supported (a single int is needed "
            "to find the pooled EOS position)"
        )
    return TextTower(
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        eos_token_id=c.eos_token_id,
        **_tower_options(c, **rates),
        **kw,
    )


def build(
    hf_config,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    checkpoint_keys=(),
    image_size: int | None = None,
    drop_path_rate: float = 0.0,
    dropout: float | None = None,
    attention_dropout: float | None = None,
    remat: str = "none",
    attention: str = "eager",
) -> CLIPModel:
    """The linen module for an HF `CLIPConfig` (both towers) or `CLIPVisionConfig` (vision tower alone).

    A "clip_vision_model" gets `visual_projection` when the checkpoint has it (`CLIPVisionModelWithProjection`)
    or when there is no checkpoint; a plain `CLIPVisionModel` has none, so use pooling="pooler" for a head.

    Args:
      image_size: fine-tuning resolution of the vision tower (e.g. 336 for a 224 checkpoint); `adapt` resamples
        the position table like ViT's, and the vision config's `image_size` is set in place so `dummy_inputs` and
        `save_pretrained` describe the model that was built.
      drop_path_rate: stochastic depth (per-example residual-branch drop in training) of both towers, each linear
        over its own layers from 0 to this rate at the last (`layers.encoder`); 0 leaves the model as HF's.
      dropout: dropout on both towers' residual branches (attention and MLP outputs). None means none, as in
        transformers' CLIP, which never applies its configs' `dropout` field.
      attention_dropout: overrides both towers' `attention_dropout` (None keeps each tower config's).
      remat: gradient checkpointing of each block of both towers (`layers.REMAT_POLICIES`: "none", "block",
        "dots"); same outputs and gradients, less activation memory, more compute.
      attention: both towers' `layers.ATTENTION` implementation, "eager" (default) or "fused" (cuDNN's flash
        kernel on a GPU in bf16; no attention dropout).
    """
    if image_size is not None:
        check_image_size(_square(image_size, "image_size"), _vision_config(hf_config).patch_size)
        _vision_config(hf_config).image_size = _square(image_size, "image_size")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    rates = dict(
        dropout=dropout,
        attention_dropout=attention_dropout,
        drop_path_rate=drop_path_rate,
        remat=remat,
        attention=attention,
    )
    vision = _vision_tower(_vision_config(hf_config), rates, **kw)
    if hf_config.model_type == "clip":
        return CLIPModel(
            vision,
            _text_tower(hf_config.text_config, rates, **kw),
            hf_config.projection_dim,
            hf_config.logit_scale_init_value,
            **kw,
        )
    with_projection = not checkpoint_keys or "visual_projection.weight" in checkpoint_keys
    return CLIPModel(vision, None, hf_config.projection_dim if with_projection else None, **kw)


def adapt(converted: dict, shapes: dict, hf_config, prefix: str) -> dict[str, str]:
    """Resamples the vision position table to the model's patch grid (CLS row kept, torch's bicubic)."""
    path = f"params/{prefix}vision/embeddings/position_embedding/embedding"
    if path not in converted or path not in shapes or converted[path].shape == shapes[path].shape:
        return {}
    table, (rows, dim) = converted[path], shapes[path].shape
    old, new = math.isqrt(table.shape[0] - 1), math.isqrt(rows - 1)
    if old * old + 1 != table.shape[0] or table.shape[1] != dim:
        return {}  # not a square grid or another width: the strict merge reports the mismatch
    converted[path] = resample_table(table[None], (old, old), (new, new))[0].astype(table.dtype)
    return {path: f"resampled {old}x{old} -> {new}x{new}"}


def dummy_inputs(hf_config) -> dict:
    """Smallest inputs that build every parameter: one token row and one image (text only for "clip")."""
    c = _vision_config(hf_config)
    size = _square(c.image_size, "image_size")
    out = {"pixel_values": np.zeros((1, c.num_channels, size, size), np.float32)}
    if hf_config.model_type == "clip":
        out["input_ids"] = np.zeros((1, 2), np.int32)
    return out


def num_layers(hf_config) -> int:
    """Depth for layer-wise LR decay: the vision tower's (LLRD targets the image tower for image transfer)."""
    return _vision_config(hf_config).num_hidden_layers


def feature_dim(hf_config) -> int:
    """Width of the default features, `image_embeds` (projection_dim)."""
    return hf_config.projection_dim


def layer_id(path: str, n_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay, counted along the vision tower.

    vision/embeddings and vision/pre_norm are 0, vision/encoder/layer_i is i+1, and everything else (post_norm,
    projections, logit_scale and the whole text tower) is n_layers+1: for image transfer the text tower is
    either unused or frozen, so it gets the top (undecayed) rate rather than a depth of its own.
    """
    return layers.layer_id_by_prefix(
        path, n_layers, ("vision/embeddings/", "vision/pre_norm/"), "vision/encoder/layer_"
    )


def block_regex(i: int) -> str:
    """Regex for every parameter of vision transformer block i."""
    return rf"^vision/encoder/layer_{i}/"


def _encoder_rules(torch_tower: str, flax_tower: str) -> list[KeyRule]:
    L, P = f"{torch_tower}encoder.layers.{{i}}.", f"params/{flax_tower}/encoder/layer_{{i}}/"
    pairs = [
        ("self_attn.q_proj", "attention/query"),
        ("self_attn.k_proj", "attention/key"),
        ("self_attn.v_proj", "attention/value"),
        ("self_attn.out_proj", "attention/out"),
        ("mlp.fc1", "mlp/fc1"),
        ("mlp.fc2", "mlp/fc2"),
    ]
    rules = [r for t, f in pairs for r in dense_rules(L + t, P + f)]
    return rules + norm_rules(L + "layer_norm1", P + "attention_norm") + norm_rules(L + "layer_norm2", P + "mlp_norm")


def _vision_rules(tower: str = "vision_model.") -> list[KeyRule]:
    E, F = f"{tower}embeddings.", "params/vision/embeddings/"
    rules = [
        KeyRule(E + "class_embedding", F + "class_embedding"),
        KeyRule(E + "patch_embedding.weight", F + "patch_embedding/kernel", CONV),
        KeyRule(E + "position_embedding.weight", F + "position_embedding/embedding"),
    ]
    rules += norm_rules(f"{tower}pre_layrnorm", "params/vision/pre_norm")  # sic: HF's spelling
    rules += norm_rules(f"{tower}post_layernorm", "params/vision/post_norm")
    return rules + _encoder_rules(tower, "vision")


def _text_rules() -> list[KeyRule]:
    E, F = "text_model.embeddings.", "params/text/embeddings/"
    rules = [KeyRule(E + f"{n}.weight", F + f"{n}/embedding") for n in ("token_embedding", "position_embedding")]
    rules += norm_rules("text_model.final_layer_norm", "params/text/final_norm")
    return rules + _encoder_rules("text_model.", "text")


def key_map(hf_config) -> KeyMap:
    """Both towers' keys, the projections and logit_scale; a vision-only model simply has no text paths.

    transformers 5 saves a plain `CLIPVisionModel` without the `vision_model.` prefix that hub checkpoints (and
    `CLIPVisionModelWithProjection`) carry; both load. Export writes the prefixed form, which every HF class reads.
    """
    rules = _vision_rules() + _text_rules()
    rules += [
        KeyRule("visual_projection.weight", "params/visual_projection/kernel", LINEAR),
        KeyRule("text_projection.weight", "params/text_projection/kernel", LINEAR),
        KeyRule("logit_scale", "params/logit_scale"),
    ]
    if hf_config.model_type == "clip_vision_model":
        rules += _vision_rules(tower="")  # after the prefixed rules, so export keeps the prefix
    return KeyMap(rules)


def classifier(hf_config) -> None:
    """No HF class shares our heads: CLIPForImageClassification nests a second `vision_model.` prefix and pools
    patch tokens; a CLIP head stays in tljax_head.safetensors (lossless through tljax)."""
    return None
