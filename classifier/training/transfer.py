"""Transfer learning: pretrained backbone weights, a frozen first phase, then fine-tuning.

``train.pretrained`` is ``none``, ``imagenet`` (the file Keras's own cache holds for the
backbone, ``$KERAS_HOME/models`` or ``~/.keras/models``) or a ``.weights.h5`` file of the
backbone under ``pretrained/``, which dvc.yaml lists as a dependency of train. Nothing is
downloaded while training: offline with nothing cached, ``imagenet`` is one line naming the
file to place and where.

Phase 1 trains the new head with the backbone frozen (its batch norm always runs in
inference mode, see classifier/model/architectures.py). Phase 2, when
``train.fine_tune_layers`` and ``train.fine_tune_epochs`` are set, unfreezes the top layers
of the backbone (batch norm layers stay frozen) and trains ``fine_tune_epochs`` more at
``train.fine_tune_learning_rate``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import keras
from keras import layers

from classifier.config import TrainParams
from classifier.errors import ParamsError
from classifier.model.architectures import BACKBONE_LAYER, BACKBONES


def is_backbone(cfg: TrainParams) -> bool:
    return cfg.architecture in BACKBONES


def fine_tunes(cfg: TrainParams) -> bool:
    """Whether training has a second, fine-tuning phase."""
    return is_backbone(cfg) and cfg.fine_tune_layers > 0 and cfg.fine_tune_epochs > 0


def total_epochs(cfg: TrainParams) -> int:
    """Epochs of both phases."""
    return cfg.epochs + (cfg.fine_tune_epochs if fine_tunes(cfg) else 0)


def imagenet_file(architecture: str) -> Path:
    """Where Keras's cache keeps the ImageNet weights of ``architecture``'s backbone."""
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    return home / "models" / BACKBONES[architecture].imagenet_file


def weights_file(cfg: TrainParams) -> Path | None:
    """The file ``train.pretrained`` names, checked to exist; None for ``none``."""
    if cfg.pretrained == "none":
        return None
    if not is_backbone(cfg):
        raise ParamsError(
            f"train.pretrained: {cfg.pretrained} applies to the backbones "
            f"({', '.join(sorted(BACKBONES))}), not to {cfg.architecture}; set it to none"
        )
    if cfg.pretrained == "imagenet":
        path = imagenet_file(cfg.architecture)
        if not path.is_file():
            url = BACKBONES[cfg.architecture].imagenet_url + path.name
            raise ParamsError(
                f"train.pretrained: imagenet: {path} is not in Keras's cache and this "
                f"machine downloads nothing while training; place {path.name} there "
                f"(from {url}), or set train.pretrained: none"
            )
        return path
    path = Path(cfg.pretrained)
    if not path.is_file():
        raise ParamsError(f"train.pretrained: {path}: no such file")
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_pretrained(model: keras.Model, cfg: TrainParams) -> Path | None:
    """Load ``train.pretrained`` into the model's backbone; return the file, if any."""
    path = weights_file(cfg)
    if path is None:
        return None
    backbone = model.get_layer(BACKBONE_LAYER)
    try:
        backbone.load_weights(path)
    except Exception as error:  # h5py and Keras raise OSError, ValueError, KeyError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ParamsError(
            f"train.pretrained: {path} does not load into {cfg.architecture} "
            f"({backbone.input_shape[1]}x{backbone.input_shape[2]}x3): {reason[:300]}"
        ) from None
    return path


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: only the head trains."""
    model.get_layer(BACKBONE_LAYER).trainable = False


def unfreeze_top(model: keras.Model, count: int) -> list[str]:
    """Phase 2: the backbone's top ``count`` layers train, batch norm aside; their names."""
    backbone = model.get_layer(BACKBONE_LAYER)
    backbone.trainable = True
    unfrozen = []
    for index, layer in enumerate(backbone.layers):
        top = index >= len(backbone.layers) - count
        layer.trainable = top and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable:
            unfrozen.append(layer.name)
    return unfrozen
