"""Run settings of the federated app, and the one parser that turns settings into config dataclasses.

Where settings come from: ``[tool.flwr.app.config]`` in pyproject.toml and its nested tables
(``[tool.flwr.app.config.unlearn]`` ...), overridden per run by ``flwr run --run-config
"unlearn.lr=3e-4 constraint.enabled=false"`` or the ``serforget simulate``/``deploy``
``--run-config`` flags. Flower flattens nested tables into dotted keys before a ServerApp or
ClientApp sees them (``flwr.common.config.flatten_dict``: ``Context.run_config`` holds
``"unlearn.lr"``, never a nested dict), and an override arrives the same way (``unlearn.lr=3e-4``
is a TOML dotted key, flattened again). Flower also refuses an override whose key pyproject
does not define (``fuse_dicts``), so every setting has its default written in pyproject; a test
keeps pyproject equal to :class:`RunSettings`'s defaults, the single place they are decided.

Why one parser: the ServerApp, the ClientApp, the CLI wrappers and the benchmarks all read the
same keys; parsing them in one module means one spelling, one type rule and one error message
per key: an unknown key says ``unlearn.lrr: unknown setting; known unlearn.* settings: ...``,
a bad value says which key and what it must be, a renamed key says its new name.

Tables (Python field = the dotted key with ``.`` and ``-`` written as ``_``, except
``constraint.enabled`` -> ``constraint`` and ``scenario.enabled`` -> ``scenario``):

- top level: where the run lives, the task, the seed, the device, FedAvg;
- ``model.*``: the architecture (``model.arch``) and its shape (the log-mel CNN's
  :class:`~serforget.common.models.cnn.CNNConfig`, or a local pre-trained wav2vec2/HuBERT);
- ``synth.*``: the synthetic corpus of a simulation (:mod:`serforget.common.corpora.synth`);
- ``unlearn.*``: the device's unlearning, i.e. the method, the stop rule, the server's wait and
  every forget-set-only knob of :class:`~serforget.common.unlearning.config.UnlearnConfig`
  (the device's importance penalty is ``unlearn.penalty-lambda`` / ``unlearn.penalty-tau``);
- ``constraint.*``: the server's elastic constraint on accepted deltas (its own scale: strength
  in [0, 1], a different setting from the device's penalty, hence a different name);
- ``scenario.*``: the default deletion requests of a simulation;
- ``release.*``: what a release ships (ONNX export, the int8 accuracy bound).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from serforget.common.corpora.synth import SynthConfig
from serforget.common.labels import TASKS
from serforget.common.manifest import SPLIT_PROTOCOLS, SplitSpec
from serforget.common.models import ARCHS
from serforget.common.models.cnn import CNNConfig
from serforget.common.traffic import check_trainable
from serforget.common.unlearning.config import FORGET_ONLY_METHODS, STOP_RULES, UnlearnConfig
from serforget.common.validation import FieldError

#: UnlearnConfig fields the ``unlearn.*`` table does not hold, and why: the run's own ``seed`` and
#: the node's ``device`` are used; the server sends ``target_forget_acc``; ``stop`` is
#: ``unlearn.stop`` (a run field, since its default ``retrain-level`` needs the server's target);
#: the remaining-data baselines' knobs belong to methods a device cannot run (it holds no
#: remaining data: ``unlearn.method`` must be forget-set-only). Per-example loss matching needs
#: ``reference_losses``, a list of held-out losses that no federated flow measures or sends yet
#: (a run config holds scalars only), so it is a library and benchmark setting for now.
_UNLEARN_NOT_IN_RUN = frozenset(
    {"seed", "device", "target_forget_acc", "stop", "remain_lr", "remain_epochs", "remain_steps_per_epoch"}
    | {"neggrad_plus_alpha", "scrub_max_epochs", "scrub_alpha", "scrub_temperature"}
    | {"loss_match_weight", "reference_losses"}
)
#: CNNConfig fields the ``model.*`` table does not hold: the project's audio is 16 kHz only.
_CNN_NOT_IN_RUN = frozenset({"sample_rate"})

#: Run-config keys of earlier versions and what they are now. Reading one is an error naming the
#: new key (a stale ``--run-config`` or pyproject must be fixed, not guessed at).
RENAMED_KEYS: dict[str, str] = {
    "arch": "model.arch",
    "model-json": "model.* (one key per setting, e.g. model.channels='8,16' model.hidden=16)",
    "unlearn-json": "unlearn.* (one key per setting, e.g. unlearn.max-epochs=5)",
    "unlearn-method": "unlearn.method",
    "unlearn-stop": "unlearn.stop",
    "unlearn-timeout": "unlearn.timeout",
    "elastic": "constraint.enabled",
    "elastic-tau": "constraint.tau",
    "elastic-strength": "constraint.strength",
    "synth-speakers": "synth.speakers",
    "synth-sentences": "synth.sentences",
    "synth-takes": "synth.takes",
    "synth-style-spread": "synth.style-spread",
    "synth-ambiguous-rate": "synth.ambiguous-rate",
    "synth-label-noise": "synth.label-noise",
    "scenario": "scenario.enabled",
    "scenario-partial-node": "scenario.partial-node",
    "scenario-partial-n": "scenario.partial-n",
    "scenario-whole-node": "scenario.whole-node",
    "onnx-export": "release.onnx-export",
    "int8-max-ua-drop": "release.int8-max-ua-drop",
    "unlearn.ela-lambda": "unlearn.penalty-lambda",
    "unlearn.tau": "unlearn.penalty-tau",
}


class SettingsError(ValueError):
    """A setting that cannot be used; the message starts with the key as the user wrote it."""


def _run_field(default: Any, key: str, check: str = "") -> Any:
    """A RunSettings field: its default, its dotted run-config key, the rule its value must meet."""
    return field(default=default, metadata={"key": key, "check": check})


@dataclass(frozen=True)
class RunSettings:
    """Every setting of one federated run; :meth:`from_mapping` is the only way in from a run config."""

    # "simulation": the ServerApp provisions a synthetic federation under work-dir;
    # "deployment": real SuperNodes bring their own data dirs (node config "data-dir")
    mode: str = _run_field("simulation", "mode", "simulation|deployment")
    # where the simulated devices, the server and the report live
    work_dir: str = _run_field("~/.serforget/sim", "work-dir")
    # deployment: the server's data dir (default: work-dir/server), an optional held-out manifest
    # for central evaluation, and how many SuperNodes to wait for
    server_dir: str = _run_field("", "server-dir")
    eval_manifest: str = _run_field("", "eval-manifest")
    min_nodes: int = _run_field(2, "min-nodes", ">=1")
    task: str = _run_field("4class", "task", "task")
    seed: int = _run_field(0, "seed")
    device: str = _run_field("auto", "device")
    clip_seconds: float = _run_field(3.0, "clip-seconds", ">0")
    # ------------------------------------------------------------------ model.*
    model_arch: str = _run_field("logmel_cnn", "model.arch", "arch")
    #: logmel_cnn: its shape (model.n-mels, model.channels = "16,32,48,64", ...)
    model_cnn: CNNConfig = _run_field(CNNConfig(), "model")
    #: wav2vec2 / hubert: a local pre-trained checkpoint folder (a run fine-tunes one; nothing is
    #: downloaded), and whether the convolutional feature encoder stays frozen
    model_pretrained_dir: str = _run_field("", "model.pretrained-dir")
    model_freeze_feature_encoder: bool = _run_field(True, "model.freeze-feature-encoder")
    #: what trains and travels (common.traffic): "all" trainable tensors, the "head", or "top-N"
    #: transformer layers and the head; the rest stays on every device (its pre-trained checkpoint)
    model_trainable: str = _run_field("all", "model.trainable", "trainable")
    # ------------------------------------------------------------------ synth.* (simulation)
    # the synthetic corpus, one node per training speaker
    synth_speakers: int = _run_field(24, "synth.speakers", ">=1")
    synth_sentences: int = _run_field(8, "synth.sentences", ">=1")
    synth_takes: int = _run_field(2, "synth.takes", ">=1")
    # what only memory can fit (common.corpora.synth; all three 0 = the generalising regime):
    # each speaker's own way of acting an emotion, ambiguous takes, annotation disagreement
    synth_style_spread: float = _run_field(0.0, "synth.style-spread", ">=0")
    synth_ambiguous_rate: float = _run_field(0.0, "synth.ambiguous-rate", "[0,1]")
    synth_label_noise: float = _run_field(0.15, "synth.label-noise", "[0,1]")
    # held-out speakers of the speaker split (synthetic or indexed corpus)
    valid_speakers: int = _run_field(3, "valid-speakers", ">=1")
    test_speakers: int = _run_field(5, "test-speakers", ">=1")
    # ------------------------------------------------------------------ split.*
    # which speakers are held out (common.manifest.SplitSpec): "random" (valid-speakers /
    # test-speakers drawn with seed), "speakers" (the fixed comma-separated lists below) or
    # "iemocap-loso" (fold = the held-out session: its female speaker validates, its male tests)
    split_protocol: str = _run_field("random", "split.protocol", "split-protocol")
    split_valid_list: str = _run_field("", "split.valid-list")
    split_test_list: str = _run_field("", "split.test-list")
    split_fold: int = _run_field(1, "split.fold", ">=1")
    # simulation on an indexed corpus (``serforget corpus index``) instead of the synthetic one:
    # its speakers are split by the same random speaker split (valid/test held out for central
    # evaluation, the retrain-level target and the utility gate); every training speaker is a node
    data_manifest: str = _run_field("", "data-manifest")
    # GPU share of every simulated node (Flower's client-resources.num-gpus; 0.25 = four nodes per
    # GPU). Ray hides the GPU from a node that asked for none, so ``device = auto`` needs this > 0
    gpus_per_node: float = _run_field(0.0, "gpus-per-node", "[0,64]")
    # ------------------------------------------------------------------ FedAvg
    # resume = start from the newest non-revoked release (num-rounds = 0: unlearning only)
    resume: bool = _run_field(False, "resume")
    num_rounds: int = _run_field(15, "num-rounds", ">=0")
    local_epochs: int = _run_field(2, "local-epochs", ">=1")
    lr: float = _run_field(0.002, "lr", ">0")
    batch_size: int = _run_field(16, "batch-size", ">=1")
    fraction_evaluate: float = _run_field(0.5, "fraction-evaluate", "[0,1]")
    importance_max_utts: int = _run_field(64, "importance-max-utts", ">=1")
    round_timeout: float = _run_field(900.0, "round-timeout", ">0")
    # ------------------------------------------------------------------ unlearn.*
    unlearn_method: str = _run_field("rl_adv_ela", "unlearn.method", "forget-only-method")
    unlearn_stop: str = _run_field("retrain-level", "unlearn.stop", "stop-rule")
    unlearn_timeout: float = _run_field(900.0, "unlearn.timeout", ">0")
    #: every other ``unlearn.*`` key: a field of this template (seed, device, stop and target are
    #: filled in on the device by :meth:`device_unlearn_config`)
    unlearn: UnlearnConfig = _run_field(UnlearnConfig(), "unlearn")
    # ------------------------------------------------------------------ constraint.* (server)
    # the elastic constraint on accepted deltas: scale_i = clip(1 - strength * imp_i, 0, 1) with
    # imp_i = min(minmax(global importance)_i / tau, 1)
    constraint: bool = _run_field(True, "constraint.enabled")
    constraint_tau: float = _run_field(0.05, "constraint.tau", "(0,1]")
    constraint_strength: float = _run_field(0.8, "constraint.strength", "[0,1]")
    # checks of every delta: norm bound relative to the global model, and the utility gate that
    # refuses a delta that alone costs more held-out (validation) UA points than max-ua-drop
    max_delta_ratio: float = _run_field(0.05, "max-delta-ratio", ">0")
    max_ua_drop: float = _run_field(2.0, "max-ua-drop", ">=0")
    # ------------------------------------------------------------------ scenario.* (simulation)
    # default scenario: deletion requests filed on two nodes before the unlearning round
    scenario: bool = _run_field(True, "scenario.enabled")
    scenario_partial_node: int = _run_field(1, "scenario.partial-node", ">=0")
    scenario_partial_n: int = _run_field(10, "scenario.partial-n", ">=1")
    scenario_whole_node: int = _run_field(2, "scenario.whole-node", ">=0")
    # federated retrain oracle (the report's exact-unlearning reference): FedAvg again from the same
    # initialisation, rounds and seeds, every node leaving out the scenario's deleted recordings.
    # Runs only where that is an oracle: scenario requests filed in this run, fresh initialisation
    retrain_oracle: bool = _run_field(True, "retrain-oracle")
    # ------------------------------------------------------------------ release.*
    release_onnx_export: bool = _run_field(True, "release.onnx-export")
    release_int8_max_ua_drop: float = _run_field(1.0, "release.int8-max-ua-drop", ">=0")

    # ---------------------------------------------------------------------------------- parsing

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunSettings":
        """Parse a flat run config (dotted keys, TOML-typed values); missing keys take the defaults.

        A nested mapping (``tomllib`` on pyproject, or ``{"unlearn": {"lr": ...}}``) is flattened
        first, exactly as Flower does. Errors name the key: unknown, renamed, wrong type, out of range.
        """
        flat = flatten(raw)
        table_values: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in _TABLE_FIELDS}
        values: dict[str, Any] = {}
        for key, value in flat.items():
            _reject_renamed(key)
            if key in _SCALARS:
                name, annotation = _SCALARS[key]
                values[name] = _typed(value, annotation, key=key)
                continue
            table, _, sub = key.partition(".")
            target = _TABLE_FIELDS.get(table)
            if target is None or sub not in {name.replace("_", "-") for name in _table_keys(target)}:
                raise SettingsError(_unknown_message(key))
            table_values[table][sub.replace("-", "_")] = (value, key)
        for table, attr in _TABLE_FIELDS.items():
            if table_values[table]:
                values[attr.name] = _build_table(attr, table_values[table])
        settings = cls(**values)
        settings._check_ranges()
        return settings

    def _check_ranges(self) -> None:
        for f in fields(self):
            rule = f.metadata.get("check", "")
            if not rule:
                continue
            value = getattr(self, f.name)
            problem = _rule_problem(rule, value)
            if problem:
                raise SettingsError(f"{f.metadata['key']}: {problem}, got {value!r}")
        lists = {"split.valid-list": self.split_valid_list, "split.test-list": self.split_test_list}
        for key, value in lists.items():
            if value and self.split_protocol != "speakers":
                raise SettingsError(
                    f"{key}: set, but split.protocol = {self.split_protocol!r} (lists are for 'speakers')"
                )
        if self.split_fold != 1 and self.split_protocol != "iemocap-loso":
            raise SettingsError(
                f"split.fold: set, but split.protocol = {self.split_protocol!r} (folds are for 'iemocap-loso')"
            )
        if self.model_arch == "logmel_cnn":
            for name, default in (
                ("model_pretrained_dir", ""),
                ("model_freeze_feature_encoder", True),
                ("model_trainable", "all"),
            ):
                if getattr(self, name) != default:
                    raise SettingsError(
                        f"{_FIELD_KEYS[name]}: set, but model.arch = 'logmel_cnn' has no pre-trained backbone "
                        "(it is for wav2vec2/hubert)"
                    )
        else:
            if not self.model_pretrained_dir:
                raise SettingsError(
                    f"model.pretrained-dir: required by model.arch = {self.model_arch!r} (a run fine-tunes a "
                    "local pre-trained checkpoint folder; nothing is downloaded)"
                )
            if self.model_cnn != CNNConfig():
                raise SettingsError(
                    f"model.*: log-mel CNN settings are set, but model.arch = {self.model_arch!r} does not use them"
                )

    # ---------------------------------------------------------------------------------- output

    def as_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat, dotted run config these settings came from (every key; TOML scalar values).

        Used for the report (which settings produced it) and to compare two runs' settings.
        """
        out: dict[str, bool | int | float | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _TABLE_ATTRS:
                table = f.metadata["key"]
                for sub in _table_keys(f):
                    out[f"{table}.{sub.replace('_', '-')}"] = _scalar(getattr(value, sub))
            else:
                out[f.metadata["key"]] = value
        return out

    def to_toml(self) -> str:
        """pyproject's ``[tool.flwr.app.config]`` block with its nested tables, in field order."""
        tables: dict[str, list[str]] = {"": []}
        for key, value in self.as_run_config().items():
            table, _, name = key.rpartition(".")
            text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            tables.setdefault(table, []).append(f"{name} = {text}")
        blocks = ["[tool.flwr.app.config]\n" + "\n".join(tables.pop(""))]
        blocks += [f"[tool.flwr.app.config.{table}]\n" + "\n".join(lines) for table, lines in tables.items()]
        return "\n\n".join(blocks) + "\n"

    # ---------------------------------------------------------------------------------- use

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser().resolve()

    @property
    def server_path(self) -> Path:
        return Path(self.server_dir).expanduser().resolve() if self.server_dir else self.work_path / "server"

    @property
    def synth_config(self) -> SynthConfig:
        """The synthetic corpus of a simulation (``synth.*``; its seed is the run's)."""
        return SynthConfig(
            n_speakers=self.synth_speakers,
            sentences_per_speaker=self.synth_sentences,
            takes_per_emotion=self.synth_takes,
            speaker_style_spread=self.synth_style_spread,
            ambiguous_rate=self.synth_ambiguous_rate,
            label_noise_rate=self.synth_label_noise,
            seed=self.seed,
        )

    @property
    def split_spec(self) -> SplitSpec:
        """The speaker split of a simulation (synthetic or indexed corpus)."""
        names = lambda text: tuple(n.strip() for n in text.split(",") if n.strip())  # noqa: E731
        return SplitSpec(
            protocol=self.split_protocol,
            n_valid=self.valid_speakers,
            n_test=self.test_speakers,
            seed=self.seed,
            valid=names(self.split_valid_list),
            test=names(self.split_test_list),
            fold=self.split_fold,
        )

    @property
    def data_manifest_path(self) -> Path | None:
        """The indexed corpus of a simulation (None: synthesize one)."""
        return Path(self.data_manifest).expanduser().resolve() if self.data_manifest else None

    @property
    def model_config(self) -> dict[str, Any]:
        """``config`` of :func:`serforget.common.models.build_model` for ``model_arch``."""
        if self.model_arch == "logmel_cnn":
            return self.model_cnn.to_dict()
        return {
            "pretrained_dir": self.model_pretrained_dir,
            "freeze_feature_encoder": self.model_freeze_feature_encoder,
        }

    def device_unlearn_config(self, *, target_forget_acc: float, device: str) -> UnlearnConfig:
        """The device's :class:`UnlearnConfig` for one round: the ``unlearn.*`` table plus the run's
        stop rule and seed, the server's held-out target and this node's device."""
        return self.unlearn.replace(
            stop=self.unlearn_stop, target_forget_acc=target_forget_acc, seed=self.seed, device=device
        )


# -------------------------------------------------------------------------------------- the parser


def flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys, as Flower's ``flatten_dict`` does (a flat mapping is unchanged)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def dataclass_from_mapping(
    cls: type,
    values: Mapping[str, Any],
    *,
    what: str,
    renamed: Mapping[str, str] = {},
    coerce_strings: bool = False,
    prefix: str = "",
    allowed: frozenset[str] | None = None,
    base: Any = None,
) -> Any:
    """Build the frozen dataclass ``cls`` from ``values`` keyed by its field names (``-`` for ``_``).

    ``coerce_strings`` reads strings as the field's type (the CLI's ``--set key=value``); without it
    a value must already have the type (TOML). ``prefix`` is how keys are named in errors (``unlearn.``);
    ``allowed`` limits which fields may be set; ``base`` is the instance whose other fields are kept.
    A :class:`~serforget.common.validation.FieldError` from the dataclass's own checks is reported
    under the key, e.g. ``unlearn.pgd-eps: must be > 0``.
    """
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if allowed is None or f.name in allowed]
    spelled = {name: prefix + name.replace("_", "-") if prefix else name for name in known}
    changes: dict[str, Any] = {}
    for raw_key, value in values.items():
        name = str(raw_key).replace("-", "_")
        shown = prefix + str(raw_key) if prefix else str(raw_key)
        if name in renamed:
            raise SettingsError(f"{shown}: renamed {prefix + renamed[name] if prefix else renamed[name]}")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {spelled[close[0]]}?)" if close else ""
            raise SettingsError(f"{shown}: unknown {what}{hint}; known: {', '.join(sorted(spelled.values()))}")
        changes[name] = (
            coerce(value, hints[name], key=shown) if coerce_strings else _typed(value, hints[name], key=shown)
        )
    try:
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)
    except FieldError as exc:
        got = f", got {changes[exc.field]!r}" if exc.field in changes else ""
        raise SettingsError(f"{spelled.get(exc.field, exc.field)}: {exc.rule}{got}") from None


def coerce(value: Any, annotation: Any, *, key: str) -> Any:
    """Read ``value`` (a string from the CLI, or an already typed value) as ``annotation``.

    Supports bool, int, float, str and ``X | None`` (``None``/``"none"``/``""`` clear it); an
    unconvertible value raises :class:`SettingsError` naming ``key``.
    """
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    try:
        if annotation is bool:
            return _to_bool(value)
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "." in value else int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise SettingsError(f"{key}: cannot read {value!r} as {annotation.__name__}") from None
    raise SettingsError(f"{key}: unsupported setting type {annotation!r}")


def _typed(value: Any, annotation: Any, *, key: str) -> Any:
    """A run-config value (TOML-typed) checked against ``annotation``; ints widen to float."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise SettingsError(f"{key}: must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingsError(f"{key}: must be an integer, got {value!r}")
    if annotation in (float, str) and (isinstance(value, bool) or not isinstance(value, annotation)):
        raise SettingsError(f"{key}: must be a {'number' if annotation is float else 'string'}, got {value!r}")
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ValueError(value)


def _reject_renamed(key: str) -> None:
    if key in RENAMED_KEYS:
        raise SettingsError(f"{key}: renamed {RENAMED_KEYS[key]}")


def _unknown_message(key: str) -> str:
    table = key.partition(".")[0] if "." in key else ""
    all_keys = list(RunSettings().as_run_config())
    same_table = [k for k in all_keys if (k.partition(".")[0] == table if table else "." not in k)]
    close = difflib.get_close_matches(key, all_keys, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    scope = f"known {table}.* settings" if table and same_table else "known top-level settings"
    if table and not same_table:
        tables = sorted({k.partition(".")[0] for k in all_keys if "." in k})
        return f"{key}: unknown setting{hint}; known tables: {', '.join(tables)}"
    return f"{key}: unknown setting{hint}; {scope}: {', '.join(same_table)}"


def _rule_problem(rule: str, value: Any) -> str:
    """What is wrong with ``value`` under a field's rule ("" when nothing)."""
    checks = {
        ">=0": (lambda v: v >= 0, "must be >= 0"),
        ">=1": (lambda v: v >= 1, "must be >= 1"),
        ">0": (lambda v: v > 0, "must be > 0"),
        "[0,1]": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        "(0,1]": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
        "[0,64]": (lambda v: 0 <= v <= 64, "must lie in [0, 64]"),
        "simulation|deployment": (lambda v: v in ("simulation", "deployment"), "must be 'simulation' or 'deployment'"),
        "task": (lambda v: v in TASKS, f"must be one of {', '.join(sorted(TASKS))}"),
        "arch": (lambda v: v in ARCHS, f"must be one of {', '.join(ARCHS)}"),
        "forget-only-method": (
            lambda v: v in FORGET_ONLY_METHODS,
            f"must be a forget-set-only method ({', '.join(FORGET_ONLY_METHODS)}): a device holds no remaining data",
        ),
        "stop-rule": (lambda v: v in STOP_RULES, f"must be one of {', '.join(STOP_RULES)}"),
        "trainable": (lambda v: _trainable_ok(v), "must be 'all', 'head' or 'top-N' (N >= 1)"),
        "split-protocol": (lambda v: v in SPLIT_PROTOCOLS, f"must be one of {', '.join(SPLIT_PROTOCOLS)}"),
    }
    ok, message = checks[rule]
    return "" if ok(value) else message


def _trainable_ok(value: Any) -> bool:
    try:
        check_trainable(value)
    except ValueError:
        return False
    return True


def _scalar(value: Any) -> bool | int | float | str:
    """A dataclass value as a run config holds it (tuples of ints as "a,b,c": TOML scalars only)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def _table_keys(attr: dataclasses.Field) -> list[str]:
    """The dataclass fields a table field exposes, in declaration order."""
    hidden = _UNLEARN_NOT_IN_RUN if attr.name == "unlearn" else _CNN_NOT_IN_RUN
    return [f.name for f in fields(_TABLE_TYPES[attr.name]) if f.name not in hidden]


def _build_table(attr: dataclasses.Field, given: dict[str, tuple[Any, str]]) -> Any:
    """The table field's dataclass with ``given`` (field -> (value, key as written)) applied."""
    values = {
        name.replace("_", "-"): _int_list(value, key=key) if name == "channels" else value
        for name, (value, key) in given.items()
    }
    return dataclass_from_mapping(
        _TABLE_TYPES[attr.name],
        values,
        what="setting",
        prefix=f"{attr.metadata['key']}.",
        allowed=frozenset(_table_keys(attr)),
        base=_TABLE_TYPES[attr.name](),
    )


def _int_list(value: Any, *, key: str) -> tuple[int, ...]:
    """``"16,32,48"`` (a run config holds no lists) as a tuple of positive ints."""
    if not isinstance(value, str):
        raise SettingsError(f"{key}: must be a string of comma-separated integers such as '16,32,48,64', got {value!r}")
    try:
        parts = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise SettingsError(f"{key}: must be comma-separated integers such as '16,32,48,64', got {value!r}") from None
    if any(p < 1 for p in parts):
        raise SettingsError(f"{key}: every channel count must be >= 1, got {value!r}")
    return parts


_TABLE_TYPES: dict[str, type] = {"unlearn": UnlearnConfig, "model_cnn": CNNConfig}
_TABLE_ATTRS = frozenset(_TABLE_TYPES)
_FIELD_KEYS: dict[str, str] = {f.name: f.metadata["key"] for f in fields(RunSettings)}
#: table name -> the RunSettings field holding its dataclass
_TABLE_FIELDS: dict[str, dataclasses.Field] = {
    f.metadata["key"]: f for f in fields(RunSettings) if f.name in _TABLE_ATTRS
}
#: dotted key -> (RunSettings field, its type) of every plain value
_SCALARS: dict[str, tuple[str, Any]] = {
    f.metadata["key"]: (f.name, typing.get_type_hints(RunSettings)[f.name])
    for f in fields(RunSettings)
    if f.name not in _TABLE_ATTRS
}
