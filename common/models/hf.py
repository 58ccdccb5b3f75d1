"""Self-supervised speech transformers (wav2vec 2.0, HuBERT) as waveform-in, logits-out SER models.

Why a wrapper: the project's model contract is ``forward(waveform[batch, samples]) -> logits`` with
all feature extraction inside the module, so one graph serves training, PGD attacks in the
waveform domain and ONNX export. The transformers classes expect a separate feature extractor
(zero-mean/unit-variance normalisation) and return output objects, so this module moves the
normalisation into the graph and returns the logits tensor alone.

Why no attention mask: wav2vec2-base/HuBERT-base checkpoints (``feat_extract_norm="group"``) are
trained without one, and a mask would make the graph data-dependent (boolean indexing) and harder
to export. A batch is therefore treated as-is: zero padding is part of the signal, exactly as the
upstream models see padded batches without a mask.

Why everything is offline: the project runs with no access to model hubs, so a pre-trained
backbone is always a directory the user downloaded themselves, loaded with ``local_files_only``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import (
    HubertConfig,
    HubertForSequenceClassification,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2ForSequenceClassification,
)
from transformers.configuration_utils import PretrainedConfig

#: Architectures this module provides, as registry names.
HF_ARCHS: tuple[str, ...] = ("wav2vec2", "hubert")

#: Version of the dict returned by :meth:`HFSpeechClassifier.spec`; bumped on incompatible change.
HF_SPEC_VERSION = 1

#: The only sample rate the project's waveforms use and these backbones were trained at.
SAMPLE_RATE = 16_000

#: Same epsilon as ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``, so a checkpoint sees the
#: input scaling it was trained with.
_NORM_EPS = 1e-7
#: Weights files transformers reads with torch.load (pickle), unlike model.safetensors.
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt"})

_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2ForSequenceClassification),
    "hubert": (HubertConfig, HubertForSequenceClassification),
}

_BUILD_KEYS = frozenset(
    {"spec_version", "arch", "hf_config", "pretrained_dir", "normalize_waveform", "freeze_feature_encoder"}
)

#: Label spellings found in public emotion checkpoints (e.g. SUPERB ER uses IEMOCAP's
#: three-letter codes) mapped to the project's canonical names, so a trained head can be reused.
_LABEL_ALIASES: dict[str, str] = {
    "neu": "neutral",
    "hap": "happy",
    "happiness": "happy",
    "exc": "happy",
    "ang": "angry",
    "anger": "angry",
    "sadness": "sad",
    "fea": "fearful",
    "fear": "fearful",
    "dis": "disgust",
    "disgusted": "disgust",
    "sur": "surprised",
    "surprise": "surprised",
    "bored": "boredom",
}


class HFSpeechClassifier(nn.Module):
    """Wraps ``Wav2Vec2ForSequenceClassification`` / ``HubertForSequenceClassification``.

    ``forward(waveform[batch, samples] float32 @ 16 kHz) -> logits[batch, len(labels)]``.
    The classifier mean-pools the projected transformer states over time, so any length at or
    above :attr:`min_samples` works.
    """

    arch: str

    def __init__(
        self,
        *,
        arch: str,
        labels: Sequence[str],
        hf_config: Mapping[str, Any] | None = None,
        pretrained_dir: Path | str | None = None,
        normalize_waveform: bool = True,
        freeze_feature_encoder: bool = True,
    ) -> None:
        """Build from ``hf_config`` (random weights) or load ``pretrained_dir`` (exactly one).

        ``freeze_feature_encoder`` stops gradient updates to the convolutional front end (the
        standard recipe for fine-tuning these models); gradients still flow through it to the
        waveform, which PGD needs.
        """
        super().__init__()
        _check_arch(arch)
        labels = _check_labels(labels)
        if (hf_config is None) == (pretrained_dir is None):
            raise ValueError(
                f"model config of arch {arch!r} needs exactly one of 'hf_config' (random weights) or "
                "'pretrained_dir' (a local checkpoint folder)"
            )
        if pretrained_dir is not None:
            directory = Path(pretrained_dir)
            backbone, head_from_checkpoint = _load_pretrained(arch=arch, directory=directory, labels=labels)
        else:
            backbone, head_from_checkpoint = _from_hf_config(arch=arch, hf_config=hf_config, labels=labels), False
        if freeze_feature_encoder:
            backbone.freeze_feature_encoder()
        self.arch = arch
        self.labels: tuple[str, ...] = labels
        self.backbone = backbone
        self.normalize_waveform = bool(normalize_waveform)
        self.feature_encoder_frozen = bool(freeze_feature_encoder)
        #: True when the classification head was taken (re-ordered) from a trained emotion checkpoint.
        self.head_from_checkpoint = head_from_checkpoint
        #: Shortest input that yields one frame from the convolutional feature encoder.
        self.min_samples = min_input_samples(backbone.config)
        #: Shortest input in training mode: SpecAugment time masks need ``mask_time_length`` frames.
        self.min_train_samples = min_input_samples(backbone.config, frames=_spec_augment_frames(backbone.config))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of raw 16 kHz waveforms."""
        self._check_waveform(waveform)
        if self.normalize_waveform:
            waveform = zero_mean_unit_var(waveform)
        return self.backbone(input_values=waveform, attention_mask=None).logits

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this exact architecture via :func:`build_hf_model`.

        The full transformers config is stored (not the pre-trained directory), so a checkpoint
        can be rebuilt on a device that never had the original download; the weights come from
        the checkpoint's state dict.
        """
        hf_config = json.loads(self.backbone.config.to_json_string(use_diff=False))
        hf_config.pop("_name_or_path", None)  # the user's local path: not architecture, not to be shipped
        return {
            "spec_version": HF_SPEC_VERSION,
            "arch": self.arch,
            "hf_config": hf_config,
            "normalize_waveform": self.normalize_waveform,
            "freeze_feature_encoder": self.feature_encoder_frozen,
        }

    def _check_waveform(self, waveform: torch.Tensor) -> None:
        """Reject inputs the backbone would fail on with an opaque convolution error."""
        if waveform.dim() != 2:
            shape = tuple(waveform.shape)
            raise ValueError(f"{self.arch}: expected waveform of shape [batch, samples], got {shape}")
        expected_dtype = self.backbone.classifier.weight.dtype
        if waveform.dtype != expected_dtype:
            raise TypeError(f"{self.arch}: expected {expected_dtype} waveform, got {waveform.dtype}")
        if _is_exporting():
            return  # a concrete length check would be baked into the graph as a constant
        needed = self.min_train_samples if self.training else self.min_samples
        if waveform.shape[1] < needed:
            mode = "training" if self.training else "inference"
            raise ValueError(
                f"{self.arch}: waveform has {waveform.shape[1]} samples; {mode} needs at least "
                f"{needed} ({needed / SAMPLE_RATE * 1000:.1f} ms at {SAMPLE_RATE} Hz)"
            )


def build_hf_model(*, arch: str, labels: Sequence[str], config: Mapping[str, Any]) -> HFSpeechClassifier:
    """Registry entry point: ``config`` is :meth:`HFSpeechClassifier.spec` (``arch`` optional) or options.

    Keys: exactly one of ``hf_config`` (dict) / ``pretrained_dir`` (path), plus optional
    ``normalize_waveform`` and ``freeze_feature_encoder`` (bools) and ``spec_version``.
    Without an explicit ``normalize_waveform``, a ``pretrained_dir`` whose
    ``preprocessor_config.json`` sets ``do_normalize`` decides it (the model was trained that way);
    otherwise it defaults to True.
    """
    _check_arch(arch)
    _check_build_config(arch=arch, config=config)
    pretrained_dir = Path(config["pretrained_dir"]) if config.get("pretrained_dir") is not None else None
    normalize = config.get("normalize_waveform")
    if normalize is None:
        normalize = _checkpoint_normalizes(pretrained_dir) if pretrained_dir is not None else True
    return HFSpeechClassifier(
        arch=arch,
        labels=labels,
        hf_config=config.get("hf_config"),
        pretrained_dir=pretrained_dir,
        normalize_waveform=normalize,
        freeze_feature_encoder=config.get("freeze_feature_encoder", True),
    )


def tiny_hf_config(*, arch: str, n_labels: int) -> dict[str, Any]:
    """A ~44k-parameter config with the real architecture, for fast tests.

    Total conv stride 80 (5 ms frames) and a 16-tap positional convolution keep a forward pass
    on seconds of audio in milliseconds, with the module types of wav2vec2-base and HuBERT-base.
    """
    _check_arch(arch)
    if n_labels < 1:
        raise ValueError(f"n_labels must be positive, got {n_labels}")
    return {
        "model_type": arch,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [32, 32, 32],
        "conv_stride": [5, 4, 4],
        "conv_kernel": [10, 8, 8],
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "classifier_proj_size": 16,
        "num_labels": n_labels,
    }


def zero_mean_unit_var(waveform: torch.Tensor) -> torch.Tensor:
    """Per-utterance normalisation of ``Wav2Vec2FeatureExtractor(do_normalize=True)``, in torch.

    Written with plain mean/multiply ops (population variance, like numpy's ``var``) so it is
    differentiable for PGD and exports to ONNX with a dynamic length axis.
    """
    centered = waveform - waveform.mean(dim=-1, keepdim=True)
    variance = (centered * centered).mean(dim=-1, keepdim=True)
    return centered / torch.sqrt(variance + _NORM_EPS)


def min_input_samples(config: PretrainedConfig, *, frames: int = 1) -> int:
    """Smallest waveform length from which the conv feature encoder outputs ``frames`` frames."""
    samples = frames
    for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        samples = (samples - 1) * stride + kernel
    return samples


def _spec_augment_frames(config: PretrainedConfig) -> int:
    """Frames a training forward needs: transformers refuses a time mask longer than the sequence."""
    if getattr(config, "apply_spec_augment", True) and config.mask_time_prob > 0:
        return max(1, config.mask_time_length)
    return 1


def _is_exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def _check_arch(arch: str) -> None:
    if arch not in _CLASSES:
        raise ValueError(f"unknown transformers arch {arch!r}; expected one of {', '.join(HF_ARCHS)}")


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    if not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"labels must be non-empty strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels!r}")
    return labels


def _check_build_config(*, arch: str, config: Mapping[str, Any]) -> None:
    unknown = sorted(set(config) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown {arch} config keys: {unknown}; expected some of {sorted(_BUILD_KEYS)}")
    if config.get("arch", arch) != arch:
        raise ValueError(f"config is for arch {config['arch']!r} but {arch!r} was requested")
    version = config.get("spec_version", HF_SPEC_VERSION)
    if version != HF_SPEC_VERSION:
        raise ValueError(f"{arch} config spec_version {version!r} is not supported (expected {HF_SPEC_VERSION})")
    for key in ("normalize_waveform", "freeze_feature_encoder"):
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise ValueError(f"{arch} config {key} must be a bool, got {config[key]!r}")
    if "hf_config" in config and not isinstance(config["hf_config"], Mapping):
        raise ValueError(f"{arch} config hf_config must be a dict, got {type(config['hf_config']).__name__}")


def _label_maps(labels: tuple[str, ...]) -> dict[str, dict]:
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def _from_hf_config(*, arch: str, hf_config: Mapping[str, Any], labels: tuple[str, ...]) -> PreTrainedModel:
    """Randomly initialised model; a stored ``id2label`` must match ``labels`` (same head semantics)."""
    config_cls, model_cls = _CLASSES[arch]
    raw = dict(hf_config)
    model_type = raw.pop("model_type", arch)
    if model_type != arch:
        raise ValueError(f"hf_config.model_type is {model_type!r} but arch is {arch!r}")
    stored = raw.pop("id2label", None)
    if stored is not None and _ordered_labels(stored, where="hf_config.id2label") != labels:
        raise ValueError(f"hf_config.id2label {stored!r} does not match labels {list(labels)!r}")
    num_labels = raw.pop("num_labels", len(labels))
    if num_labels != len(labels):
        raise ValueError(f"hf_config.num_labels is {num_labels} but {len(labels)} labels were given")
    raw.pop("label2id", None)
    config = config_cls.from_dict({**raw, **_label_maps(labels)})
    return model_cls(config)


def _ordered_labels(id2label: Mapping[Any, str], *, where: str) -> tuple[str, ...]:
    """``{0: a, 1: b}`` (int or JSON string keys) -> ``(a, b)``; rejects gaps and bad keys."""
    try:
        by_index = {int(key): value for key, value in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: keys must be class indices, got {list(id2label)!r}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"{where}: class indices must be 0..n-1, got {sorted(by_index)!r}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _checkpoint_normalizes(directory: Path) -> bool:
    """``do_normalize`` of the checkpoint's feature extractor, True when it has none."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return True
    value = _read_json(path).get("do_normalize", True)
    if not isinstance(value, bool):
        raise ValueError(f"{path}: do_normalize must be a bool, got {value!r}")
    return value


def _check_checkpoint_dir(*, arch: str, directory: Path) -> None:
    """Fail early, naming the directory, on anything that is not a local ``arch`` checkpoint."""
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained_dir {directory}: no such directory (download the checkpoint there first)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"pretrained_dir {directory}: no config.json, so not a transformers checkpoint")
    model_type = _read_json(config_path).get("model_type")
    if model_type not in _CLASSES:
        raise ValueError(f"pretrained_dir {directory}: model_type {model_type!r} is not one of {', '.join(HF_ARCHS)}")
    if model_type != arch:
        raise ValueError(
            f"pretrained_dir {directory}: holds a {model_type!r} checkpoint but arch {arch!r} was requested"
        )
    preprocessor_path = directory / "preprocessor_config.json"
    if preprocessor_path.is_file():
        rate = _read_json(preprocessor_path).get("sampling_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise ValueError(
                f"{preprocessor_path}: sampling_rate {rate} Hz, but the project's audio is {SAMPLE_RATE} Hz"
            )


def _load_pretrained(*, arch: str, directory: Path, labels: tuple[str, ...]) -> tuple[PreTrainedModel, bool]:
    """Load a user's local checkpoint and give it a head for ``labels``.

    Returns the model and whether its head came from the checkpoint. The checkpoint is loaded
    with its own config, so every stored tensor fits; the head is then rebuilt for ``labels``
    (see :func:`_rehead`). Comparing label *names* rather than head sizes matters: a 4-class
    checkpoint in another label order has the same shape as ours but different meaning.
    """
    _check_checkpoint_dir(arch=arch, directory=directory)
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: local_files_only already forbids fetching
    _, model_cls = _CLASSES[arch]
    try:
        model, info = model_cls.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        raise ValueError(f"pretrained_dir {directory}: cannot load a {arch} checkpoint: {exc}") from exc
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) blocked a pickle that would run code: a tampered or
        # foreign file, to be reported like any other bad checkpoint, naming the file
        from serforget.common.checkpoint import CheckpointError  # lazy: common.checkpoint imports this package

        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES) or [
            "a pickle weights file"
        ]
        raise CheckpointError(
            f"pretrained_dir {directory}: {', '.join(pickles)} holds a pickle payload that is not plain tensors; "
            "refused by torch's weights-only loader (replace the file with a trusted copy or model.safetensors)"
        ) from None
    missing = set(info.get("missing_keys", ()))
    _check_backbone_loaded(model=model, missing=missing, directory=directory)
    head_trained = not {"classifier.weight", "classifier.bias"} & missing
    head_from_checkpoint = _rehead(model, labels=labels, head_trained=head_trained)
    return model, head_from_checkpoint


def _check_backbone_loaded(*, model: PreTrainedModel, missing: set[str], directory: Path) -> None:
    """A checkpoint that leaves encoder weights at random init would silently train from scratch."""
    prefix = f"{model.base_model_prefix}."
    # masked_spec_embed is only used for SpecAugment during training; some checkpoints omit it.
    absent = sorted(k for k in missing if k.startswith(prefix) and not k.endswith("masked_spec_embed"))
    if absent:
        shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise ValueError(f"pretrained_dir {directory}: checkpoint lacks {len(absent)} backbone weights ({shown})")


def _canonical(name: str) -> str:
    key = name.strip().lower()
    return _LABEL_ALIASES.get(key, key)


def _checkpoint_rows(checkpoint_labels: tuple[str, ...], labels: tuple[str, ...]) -> list[int] | None:
    """Row of the checkpoint head for each of ``labels``, or None if some label has no unique row."""
    canonical = [_canonical(name) for name in checkpoint_labels]
    rows = []
    for label in labels:
        matches = [i for i, name in enumerate(canonical) if name == label]
        if len(matches) != 1:
            return None
        rows.append(matches[0])
    return rows


def _rehead(model: PreTrainedModel, *, labels: tuple[str, ...], head_trained: bool) -> bool:
    """Replace the classifier with one for ``labels``; reuse trained rows when names match.

    Taking a subset of rows in our order keeps a trained emotion head (e.g. SUPERB ER) usable
    without fine-tuning; anything else gets a freshly initialised head. Returns True on reuse.
    """
    old = model.classifier
    new = nn.Linear(old.in_features, len(labels), dtype=old.weight.dtype)
    checkpoint_labels = _ordered_labels(model.config.id2label, where="config.json id2label")
    rows = _checkpoint_rows(checkpoint_labels, labels) if head_trained else None
    with torch.no_grad():
        if rows is not None:
            new.weight.copy_(old.weight[rows])
            new.bias.copy_(old.bias[rows])
        else:
            nn.init.normal_(new.weight, mean=0.0, std=model.config.initializer_range)
            nn.init.zeros_(new.bias)
    model.classifier = new
    maps = _label_maps(labels)
    model.config.id2label = maps["id2label"]
    model.config.label2id = maps["label2id"]
    return rows is not None
