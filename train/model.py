"""Vision Transformer builders on keras.ops / keras.layers only (runs under TensorFlow, JAX or PyTorch).

The model takes raw 0..255 RGB images of `cfg.image_size` (uint8 or float) and returns class
probabilities. Everything image-related happens in the graph: rescaling, augmentation (training only),
patch extraction. The class-token vector after the final LayerNorm is the layer named "embedding";
`embedding_model(model)` exposes it for representation learning (off-class detection, clustering).
"""

from __future__ import annotations

import math

from train.backend import keras  # first: keras imported without TensorFlow's start-up lines
from train.presets import ViTConfig

layers, ops = keras.layers, keras.ops

PACKAGE = "curate_train"


@keras.saving.register_keras_serializable(package=PACKAGE)
class Patches(layers.Layer):
    """Cut images (B, H, W, C) into non-overlapping patches (B, N, P*P*C).

    Layout equals `patchify(image, (P, P, C), step=P).reshape(N, -1)`: patches in row-major order
    (left to right, then top to bottom), each flattened as (row, column, channel).
    """

    def __init__(self, patch_size: int, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        _, h, w, c = images.shape
        p = self.patch_size
        nh, nw = h // p, w // p
        x = images[:, : nh * p, : nw * p, :]
        x = ops.reshape(x, (-1, nh, p, nw, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, nh, nw, p, p, c)
        return ops.reshape(x, (-1, nh * nw, p * p * c))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.patch_size
        return (b, (h // p) * (w // p), p * p * c)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(layers.Layer):
    """Prepend one learned token to a sequence (B, N, D) -> (B, N + 1, D)."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="token")

    def call(self, x):
        token = ops.broadcast_to(ops.cast(self.token, x.dtype), (ops.shape(x)[0], 1, ops.shape(x)[2]))
        return ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        b, n, d = input_shape
        return (b, None if n is None else n + 1, d)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(layers.Layer):
    """Add a learned embedding per sequence position: (B, N, D) + (N, D)."""

    def build(self, input_shape):
        self.position = self.add_weight(shape=(input_shape[1], input_shape[2]),
                                        initializer=keras.initializers.RandomNormal(stddev=0.02), name="position")

    def call(self, x):
        return x + ops.cast(self.position, x.dtype)[None]


@keras.saving.register_keras_serializable(package=PACKAGE)
class TakeToken(layers.Layer):
    """Select one sequence position: (B, N, D) -> (B, D); index 0 is the class token."""

    def __init__(self, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, x):
        return x[:, self.index, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


def augmentation(cfg: ViTConfig, seed: int | None = None) -> keras.Sequential:
    """Random flip, rotation, zoom and translation; identity at inference."""
    return keras.Sequential([
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed),
        layers.RandomZoom((-cfg.zoom, cfg.zoom), fill_mode="reflect", seed=seed),
        layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode="reflect", seed=seed),
    ], name="augment")


def linear_patch_embedding(x, cfg: ViTConfig):
    """The original ViT: flatten each patch and project it to hidden_dim."""
    x = Patches(cfg.patch_size, name="patches")(x)
    return layers.Dense(cfg.hidden_dim, name="patch_embedding")(x)


def conv_stem(x, cfg: ViTConfig):
    """log2(patch_size) stride-2 3x3 conv blocks, then a 1x1 projection: one hidden_dim token per patch.

    Locality and translation equivariance in the tokeniser is what lets a ViT learn from a few thousand
    images (Xiao et al. 2021, "Early convolutions help transformers see better").
    """
    steps = int(round(math.log2(cfg.patch_size)))
    if 2**steps != cfg.patch_size:
        raise ValueError(f"conv stem needs a power-of-two patch_size, got {cfg.patch_size}")
    for i in range(steps):
        filters = max(16, cfg.hidden_dim // 2 ** (steps - 1 - i))
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"stem_conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"stem_bn{i}")(x)  # short runs: track stats fast
        x = layers.Activation("gelu", name=f"stem_gelu{i}")(x)
    x = layers.Conv2D(cfg.hidden_dim, 1, name="patch_embedding")(x)
    side = cfg.image_size // cfg.patch_size
    return layers.Reshape((side * side, cfg.hidden_dim), name="tokens")(x)  # row-major, like Patches


def mlp(x, cfg: ViTConfig, name: str):
    x = layers.Dense(cfg.mlp_dim, activation="gelu", name=f"{name}_dense1")(x)
    x = layers.Dropout(cfg.dropout, name=f"{name}_drop1")(x)
    x = layers.Dense(cfg.hidden_dim, name=f"{name}_dense2")(x)
    return layers.Dropout(cfg.dropout, name=f"{name}_drop2")(x)


def encoder_block(x, cfg: ViTConfig, name: str):
    """Pre-norm transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    y = layers.MultiHeadAttention(cfg.num_heads, key_dim=cfg.head_key_dim, dropout=cfg.attention_dropout,
                                  name=f"{name}_mha")(y, y)
    x = layers.Add(name=f"{name}_add1")([x, y])
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = mlp(y, cfg, name=f"{name}_mlp")
    return layers.Add(name=f"{name}_add2")([x, y])


def build_vit(cfg: ViTConfig, num_classes: int, seed: int | None = None) -> keras.Model:
    """A ViT classifier: (B, S, S, 3) images in 0..255 -> (B, num_classes) softmax probabilities."""
    inputs = keras.Input((cfg.image_size, cfg.image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if cfg.augment:
        x = augmentation(cfg, seed)(x)
    x = conv_stem(x, cfg) if cfg.stem == "conv" else linear_patch_embedding(x, cfg)
    if cfg.pos_emb_on_class_token:
        x = ClassToken(name="class_token")(x)
        x = PositionEmbedding(name="position_embedding")(x)
    else:  # the blog post: positions for the patches only, class token prepended afterwards
        x = PositionEmbedding(name="position_embedding")(x)
        x = ClassToken(name="class_token")(x)
    for i in range(cfg.num_layers):
        x = encoder_block(x, cfg, name=f"block{i}")
    x = layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    embedding = TakeToken(0, name="embedding")(x)
    x = layers.Dropout(cfg.head_dropout, name="head_dropout")(embedding) if cfg.head_dropout else embedding
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="vit")


def embedding_model(model: keras.Model) -> keras.Model:
    """The same weights, two outputs: (probabilities, class-token embedding after the final LayerNorm)."""
    return keras.Model(model.inputs, [model.output, model.get_layer("embedding").output])
