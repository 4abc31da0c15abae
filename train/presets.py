"""Training recipes as dataclasses: the model shape (`ViTConfig`) and how to train it (`Preset`).

`seed` reproduces the original blog post (a ViT-Base-sized model trained from scratch on flower_photos),
including its `key_dim=hidden_dim` attention bug, so it is the baseline every other recipe is compared to.
`cpu`, `gpu` and `tiny` use what makes small-data ViTs learn: a convolutional stem (small effective
patches with a local inductive bias), in-graph augmentation, AdamW with warm-up and cosine decay,
label smoothing, and `key_dim = width // heads` like every standard transformer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from curate.io import CurateError


@dataclass(frozen=True)
class ViTConfig:
    """The shape of a Vision Transformer.

    image_size: input side in pixels (images are squashed to image_size x image_size).
    patch_size: side of one token's patch in input pixels.
    stem: "linear" = flatten each patch and project it (the original ViT and the blog post);
          "conv" = a stack of stride-2 3x3 convolutions down to one vector per patch (needs a power-of-two
          patch_size), which trains far better from scratch on small data.
    key_dim: per-head query/key size; None means hidden_dim // num_heads. The blog post used hidden_dim.
    pos_emb_on_class_token: the blog added the position embedding to the patches only, then prepended the
          class token; the standard ViT gives the class token a position too.
    augment: in-graph random flip / rotation / zoom / translation (active only while training).
    """

    image_size: int = 64
    patch_size: int = 8
    num_layers: int = 6
    hidden_dim: int = 128
    num_heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.1
    attention_dropout: float = 0.0
    key_dim: int | None = None
    stem: str = "conv"
    pos_emb_on_class_token: bool = True
    head_dropout: float = 0.0
    augment: bool = True
    rotation: float = 0.05  # fraction of a full turn, as keras.layers.RandomRotation takes it
    zoom: float = 0.2
    translation: float = 0.1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_key_dim(self) -> int:
        return self.key_dim if self.key_dim is not None else self.hidden_dim // self.num_heads


@dataclass(frozen=True)
class Preset:
    """A training recipe: the model plus optimiser, schedule, batch size, epochs and callbacks.

    schedule: "plateau" = constant rate cut by ReduceLROnPlateau (the blog post);
              "cosine" = linear warm-up then cosine decay to zero, per step.
    early_stopping_patience: epochs without val_loss improvement before stopping; None = never stop early.
    run_eagerly: run the train and test steps eagerly instead of tracing them into a TensorFlow graph. Only
              for tiny models on a few photos (tests): tracing a fresh model's train step costs ~10 s on
              2 CPU cores, training a few photos eagerly ~1 s; for anything larger the graph is faster.
    """

    name: str
    model: ViTConfig
    batch_size: int = 64
    epochs: int = 40
    optimizer: str = "adamw"  # "adam" or "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    clipvalue: float | None = None
    clipnorm: float | None = 1.0
    schedule: str = "cosine"
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    plateau_patience: int = 10
    plateau_factor: float = 0.1
    plateau_min_lr: float = 1e-10
    early_stopping_patience: int | None = None
    checkpoint_monitor: str = "val_acc"
    run_eagerly: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def with_epochs(self, epochs: int | None) -> Preset:
        return self if epochs is None else dataclasses.replace(self, epochs=int(epochs))


# The blog post, as written: patchify to 25x25 patches of a 200x200 image (64 tokens of 1875 values),
# Dense(768) projection, 12 encoder layers with MultiHeadAttention(12 heads, key_dim=768) -- the bug that
# makes each head 768 wide instead of 64 and the model 398M parameters instead of ~86M -- Adam 1e-4 with
# clipvalue=1.0, batch 16, categorical cross-entropy, ModelCheckpoint/ReduceLROnPlateau(val_loss, 0.1,
# patience 10, min_lr 1e-10)/CSVLogger/EarlyStopping(val_loss, patience 50), no augmentation.
SEED = Preset(
    name="seed",
    model=ViTConfig(image_size=200, patch_size=25, num_layers=12, hidden_dim=768, num_heads=12, mlp_dim=3072,
                    dropout=0.1, key_dim=768, stem="linear", pos_emb_on_class_token=False, head_dropout=0.1,
                    augment=False),
    batch_size=16, epochs=20, optimizer="adam", learning_rate=1e-4, weight_decay=0.0, clipvalue=1.0,
    clipnorm=None, schedule="plateau", warmup_epochs=0, label_smoothing=0.0, plateau_patience=10,
    plateau_factor=0.1, plateau_min_lr=1e-10, early_stopping_patience=50, checkpoint_monitor="val_loss",
    notes="the original blog post's recipe, key_dim=hidden_dim bug included",
)

# A whole flower_photos run in <= 20 minutes on 2 CPU cores: 64 px, a conv stem down to 4x4 tokens.
CPU = Preset(
    name="cpu",
    model=ViTConfig(image_size=64, patch_size=16, num_layers=6, hidden_dim=128, num_heads=4, mlp_dim=256,
                    dropout=0.1, stem="conv"),
    # 40 epochs reached the same validation accuracy by epoch ~14 and only overfit afterwards (train 93%, val 69%).
    batch_size=64, epochs=25, optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, clipnorm=1.0,
    schedule="cosine", warmup_epochs=3, label_smoothing=0.1,
    notes="2-core CPU budget: 64 px, conv stem to 4x4 tokens of 16 px, 6x128 encoder",
)

# A T4-class GPU: more pixels and tokens (16x16 grid), a wider, deeper encoder, longer schedule.
GPU = Preset(
    name="gpu",
    model=ViTConfig(image_size=128, patch_size=8, num_layers=8, hidden_dim=256, num_heads=8, mlp_dim=512,
                    dropout=0.1, stem="conv"),
    batch_size=64, epochs=150, optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, clipnorm=1.0,
    schedule="cosine", warmup_epochs=10, label_smoothing=0.1,
    notes="T4-class GPU: 128 px, conv stem, 8x256 encoder (not measured: no GPU here)",
)

# `curate flag` trains K of these (one per fold, plus one on all photos for the grouped folds), so each
# must be small: the cpu recipe at 48 px, a conv stem to 6x6 tokens, a 4x96 encoder, 15 epochs.
FLAG = dataclasses.replace(
    CPU, name="flag",
    model=dataclasses.replace(CPU.model, image_size=48, patch_size=8, num_layers=4, hidden_dim=96, mlp_dim=192),
    epochs=15, warmup_epochs=1,
    notes="curate flag's K-fold model: K of them must fit the 45-minute budget on 2 CPU cores",
)

# For tests: seconds per run on a handful of photos.
TINY = Preset(
    name="tiny",
    model=ViTConfig(image_size=32, patch_size=8, num_layers=1, hidden_dim=16, num_heads=2, mlp_dim=32,
                    dropout=0.0, stem="conv"),
    batch_size=8, epochs=2, optimizer="adamw", learning_rate=1e-3, weight_decay=0.01, clipnorm=1.0,
    schedule="cosine", warmup_epochs=0, label_smoothing=0.1, run_eagerly=True,
    notes="for tests only",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (SEED, CPU, GPU, TINY)}


def get_preset(preset: str | Preset) -> Preset:
    """The `Preset` named `preset` (seed, cpu, gpu, tiny); a `Preset` passes through."""
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise CurateError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
