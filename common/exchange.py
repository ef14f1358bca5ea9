"""What travels between coordinator and sites, and how it is checked on arrival.

Weights travel as Flower ``ArrayRecord``s keyed by the encoder's ``state_dict`` names;
instructions travel as a flat ``ConfigRecord`` with dotted keys (``model.hidden_size``) so
a site can rebuild exactly the configs the coordinator used and check them against its own
policy before touching data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord

from ctfed.common.config import (
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    MonitorConfig,
    PrivacyConfig,
    TrainConfig,
    Transport,
    to_section,
)
from ctfed.common.finetune import FinetuneRoundPlan

# Record keys shared by both sides; one definition so a rename cannot split them.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
NUM_EXAMPLES_KEY = "num-examples"
PEAK_RSS_KEY = "peak-rss-mb"
LOCAL_STATE_KEY = "ssl-local-state"
# Run config key naming the run folder (ServerApp: results; simulated sites: state folders).
RUN_DIR_KEY = "run-dir"

# Round instructions beyond the flattened config sections. A site's policy is checked
# against these before it reads any data (client/policy.py).
SERVER_ROUND_KEY = "server-round"  # set by Flower's strategy
PHASE_KEY = "run.phase"
MIN_SITES_KEY = "federation.min_sites"
# Whether the coordinator aggregates this round with secure aggregation.
SECURE_AGGREGATION_KEY = "federation.secure_aggregation"
# Float format of a plain-path update on the wire (common.config.Transport).
TRANSPORT_KEY = "federation.transport"
PRETRAIN_PHASE = "pretrain"
FINETUNE_PHASE = "finetune"  # federated progressive-freezing fine-tuning (phase 2)

# Phase-1 round instructions: the representation monitor's settings travel as ``monitor.*``,
# and (when enabled) the ``finetune.*`` recipe whose split and pooling it follows.
MONITOR_SECTION = "monitor"

# Phase-2 round instructions: the fine-tuning recipe travels flattened as ``finetune.*``;
# the coordinator's plan for the round as the keys below (common/finetune.FinetuneRoundPlan).
FINETUNE_SECTION = "finetune"
PLAN_STAGE_KEY = "plan.stage"
PLAN_BLOCKS_KEY = "plan.trainable_blocks"
PLAN_STEM_KEY = "plan.train_stem"
PLAN_SCHEDULE_START_KEY = "plan.schedule_start"
PLAN_SCHEDULE_TOTAL_KEY = "plan.schedule_total"
PLAN_LOCAL_STEPS_KEY = "plan.local_steps"
# Whether the arrays are the whole classifier (True) or only its trainable part, and the
# digest of the whole classifier the site must hold to complete a partial one.
FULL_STATE_KEY = "plan.full_state"
BASE_DIGEST_KEY = "plan.base_sha256"
# Phase-2 reply metrics: trainable parameter elements, and held-out evaluation values as
# ``eval/<task>/<metric>`` (point estimate) and ``.../low``, ``.../high`` (bootstrap CI).
TRAINABLE_PARAMETERS_KEY = "trainable-parameters"
EVAL_METRIC_PREFIX = "eval/"

# Reply metrics a site adds: local DP's epsilon (the site's own accountant, at
# privacy.local.delta) and central DP's clip scale (1.0: the update was within the bound).
EPSILON_KEY = "dp-epsilon"
CLIP_SCALE_KEY = "dp-clip-scale"

# A site that declines a round replies with a Flower Error carrying one of these codes,
# and a reason that names the site (see refusal_reason).
POLICY_REFUSED_CODE = 4001
BUDGET_REFUSED_CODE = 4002
NO_LABELS_REFUSED_CODE = 4003  # phase 2 at a site without (enough) labelled scans
REFUSAL_CODES = (POLICY_REFUSED_CODE, BUDGET_REFUSED_CODE, NO_LABELS_REFUSED_CODE)

# Outcome of one site in one round (results.json).
STATUS_AGGREGATED = "aggregated"
STATUS_REJECTED = "rejected"  # the coordinator would not use the update
STATUS_FAILED = "failed"  # the site's ClientApp raised
STATUS_REFUSED = "refused"  # the site declined by its policy or privacy budget
STATUS_TIMEOUT = "timeout"  # no reply before federation.round_timeout_s
# Secure aggregation only:
STATUS_DROPPED = "dropped"  # went silent during a protocol stage
STATUS_NOT_AGGREGATED = "not-aggregated"  # took part, but the secure round could not complete


class UpdateRejected(ValueError):
    """An incoming set of weights that must not be used; the message says why."""


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a state dict for sending (tensors are copied to CPU, detached)."""
    return ArrayRecord({name: tensor.detach().cpu() for name, tensor in state.items()})


def record_to_state(
    record: ArrayRecord, expected: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Unpack and validate received weights.

    With ``expected`` (the receiver's own state dict), names and shapes must match
    exactly; every floating tensor must be finite. Raises UpdateRejected otherwise.
    """
    return _checked(record.to_torch_state_dict(), expected)


# numpy, which Flower's arrays are, has no bfloat16: its 16 bits travel as int16.
_WIRE_DTYPES = {
    Transport.float32: torch.float32,
    Transport.float16: torch.float16,
    Transport.bfloat16: torch.int16,
}


def wire_dtype(transport: Transport) -> torch.dtype:
    """The dtype a ``transport`` update's arrays have in the message."""
    return _WIRE_DTYPES[transport]


def transport_from_instructions(instructions: Mapping[str, Any]) -> Transport:
    """The round's update format (float32 from a coordinator that does not say)."""
    value = str(instructions.get(TRANSPORT_KEY, Transport.float32.value))
    try:
        return Transport(value)
    except ValueError:
        raise ConfigError(
            f"unknown {TRANSPORT_KEY} '{value}' in the instructions; expected one of {[t.value for t in Transport]}"
        ) from None


def encode_update(delta: Mapping[str, torch.Tensor], transport: Transport) -> ArrayRecord:
    """A site's update as sent: each tensor cast to the transport's float format."""
    if transport is Transport.bfloat16:
        return state_to_record({name: t.to(torch.bfloat16).view(torch.int16) for name, t in delta.items()})
    return state_to_record({name: t.to(wire_dtype(transport)) for name, t in delta.items()})


def decode_update(
    record: ArrayRecord, expected: Mapping[str, torch.Tensor], transport: Transport
) -> dict[str, torch.Tensor]:
    """A received update, vetted and upcast to float32 for aggregation: every array must
    have the round's wire dtype (a site that sends another format is rejected, not
    converted), names and shapes those of ``expected``, and every value be finite."""
    return _checked(transported_values(record, transport), expected)


def transported_values(record: ArrayRecord, transport: Transport) -> dict[str, torch.Tensor]:
    """The float32 values an update record of format ``transport`` carries (UpdateRejected
    when an array has another dtype)."""
    wire = wire_dtype(transport)
    wire_name = str(wire).removeprefix("torch.")
    if transport is Transport.bfloat16:
        wire_name += " (bfloat16 bits)"
    received = record.to_torch_state_dict()
    for name, tensor in received.items():
        if tensor.dtype != wire:
            raise UpdateRejected(
                f"'{name}' arrived as {str(tensor.dtype).removeprefix('torch.')}; federation.transport="
                f"{transport.value} sends {wire_name}"
            )
    if transport is Transport.bfloat16:
        return {name: t.view(torch.bfloat16).float() for name, t in received.items()}
    return {name: t.float() for name, t in received.items()}


def _checked(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if expected is not None:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise UpdateRejected(
                f"parameter names differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise UpdateRejected(
                    f"'{name}' has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
                )
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UpdateRejected(f"'{name}' contains NaN or infinite values")
    return state


def state_delta(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a site sends: its weights minus the global weights it started from.

    Deltas, not weights, so that clipping (central DP), quantisation (secure aggregation)
    and norm checks act on what the site learned this round.
    """
    return {name: (new[name].detach().cpu().float() - base[name].detach().cpu().float()) for name in base}


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The next global weights: ``base + delta`` in ``base``'s dtypes."""
    return {name: (tensor.float() + delta[name].float()).to(tensor.dtype) for name, tensor in base.items()}


def update_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update, all tensors together."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in state.values() if t.is_floating_point())
    return math.sqrt(total)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays (what a round costs on the wire, before framing)."""
    return sum(len(array.data) for array in record.values())


def payload_sha256(arrays: ArrayRecord | None, metrics: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of what a message carries: every array (name, dtype, shape, serialised bytes,
    in name order) followed by the metrics as canonical JSON. Either side can recompute it."""
    digest = hashlib.sha256()
    for name in sorted(arrays.keys()) if arrays is not None else []:
        array = arrays[name]
        digest.update(f"{name}\0{array.dtype}\0{list(array.shape)}\0".encode())
        digest.update(array.data)
    digest.update(json.dumps(dict(metrics or {}), sort_keys=True, allow_nan=True).encode())
    return digest.hexdigest()


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}"
        if is_dataclass(value):
            _flatten(key, value, out)
        elif isinstance(value, (list, tuple)):
            if value and is_dataclass(value[0]):
                raise TypeError(f"{key}: lists of sections cannot travel in a ConfigRecord")
            out[key] = [float(v) if isinstance(v, float) else v for v in value]
        elif hasattr(value, "value"):  # enums travel as their string value
            out[key] = value.value
        elif value is None:  # a ConfigRecord holds no None: the site fills in the default (None: auto)
            continue
        else:
            out[key] = value


def configs_to_record(
    model: ModelConfig, train: TrainConfig, privacy: PrivacyConfig | None = None, **extra: Any
) -> ConfigRecord:
    """Flatten the configs a site needs for one round into a ConfigRecord."""
    flat: dict[str, Any] = {}
    _flatten("model", model, flat)
    _flatten("train", train, flat)
    _flatten("privacy", privacy or PrivacyConfig(), flat)
    flat.update(extra)
    return ConfigRecord(flat)


def _section(record: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The keys under ``prefix.``, nested again (``local.delta`` -> {"local": {"delta": ...}})."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if not key.startswith(prefix + "."):
            continue
        *parents, leaf = key[len(prefix) + 1 :].split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def _check_finite(section: Any, prefix: str) -> None:
    for key, value in asdict(section).items():
        if isinstance(value, dict):
            _check_finite_dict(value, f"{prefix}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"received non-finite value for {prefix}.{key}")


def _check_finite_dict(values: dict[str, Any], prefix: str) -> None:
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"received non-finite value for {prefix}.{key}")


def record_to_configs(record: Mapping[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Rebuild and validate the configs a coordinator sent (unknown keys are an error)."""
    model = to_section(ModelConfig, _section(record, "model"))
    train = to_section(TrainConfig, _section(record, "train"))
    for section in (model, train):
        for key, value in asdict(section).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"received non-finite value for {key}")
    return model, train


def record_to_privacy(record: Mapping[str, Any]) -> PrivacyConfig:
    """The round's privacy settings (none if the coordinator sent no privacy section)."""
    privacy = to_section(PrivacyConfig, _section(record, "privacy"))
    _check_finite(privacy.local, "privacy.local")
    _check_finite(privacy.central, "privacy.central")
    return privacy


def refusal_reason(site_id: str, reason: str) -> str:
    """An error reason that names the refusing site (an error reply carries no content)."""
    return f"site {site_id} refuses: {reason}"


def refusing_site(reason: str) -> str | None:
    """The site id ``refusal_reason`` put into ``reason``, if any."""
    prefix, sep, _ = reason.partition(" refuses: ")
    return prefix[len("site ") :] if sep and prefix.startswith("site ") else None


def finetune_to_record(finetune: FinetuneConfig, plan: FinetuneRoundPlan, local_steps: int) -> dict[str, Any]:
    """Phase-2 instruction entries: the recipe (``finetune.*``) and this round's plan."""
    flat: dict[str, Any] = {}
    _flatten(FINETUNE_SECTION, finetune, flat)
    flat.update(
        {
            PLAN_STAGE_KEY: plan.stage,
            PLAN_BLOCKS_KEY: [int(b) for b in plan.blocks],
            PLAN_STEM_KEY: plan.stem,
            PLAN_SCHEDULE_START_KEY: plan.schedule_start,
            PLAN_SCHEDULE_TOTAL_KEY: plan.schedule_total,
            PLAN_LOCAL_STEPS_KEY: local_steps,
        }
    )
    return flat


def record_to_finetune(record: Mapping[str, Any]) -> tuple[FinetuneConfig, FinetuneRoundPlan, int]:
    """The recipe, the round's plan and its local steps from phase-2 instructions."""
    finetune = to_section(FinetuneConfig, _section(record, FINETUNE_SECTION))
    _check_finite(finetune, FINETUNE_SECTION)
    for name in ("block_lrs", "unfreeze_fractions"):
        if not all(math.isfinite(v) for v in getattr(finetune, name)):
            raise ConfigError(f"received non-finite value in {FINETUNE_SECTION}.{name}")
    try:
        plan = FinetuneRoundPlan(
            stage=str(record[PLAN_STAGE_KEY]),
            blocks=tuple(int(b) for b in record[PLAN_BLOCKS_KEY]),
            stem=bool(record[PLAN_STEM_KEY]),
            schedule_start=int(record[PLAN_SCHEDULE_START_KEY]),
            schedule_total=int(record[PLAN_SCHEDULE_TOTAL_KEY]),
        )
        local_steps = int(record[PLAN_LOCAL_STEPS_KEY])
    except KeyError as err:
        raise ConfigError(f"phase-2 instructions lack {err}") from None
    if local_steps < 1:
        raise ConfigError(f"phase-2 instructions ask for {local_steps} local steps")
    return finetune, plan, local_steps


def monitor_to_record(monitor: MonitorConfig, finetune: FinetuneConfig) -> dict[str, Any]:
    """Phase-1 instruction entries for the representation monitor: ``monitor.*``, plus the
    ``finetune.*`` recipe (label names, split, pooling) when the monitor is on."""
    flat: dict[str, Any] = {}
    _flatten(MONITOR_SECTION, monitor, flat)
    if monitor.enabled:
        _flatten(FINETUNE_SECTION, finetune, flat)
    return flat


def record_to_monitor(record: Mapping[str, Any]) -> tuple[MonitorConfig, FinetuneConfig] | None:
    """The monitor's settings and the recipe it follows from phase-1 instructions; None when the
    coordinator sent none or switched the monitor off."""
    section = _section(record, MONITOR_SECTION)
    if not section:
        return None
    monitor = to_section(MonitorConfig, section)
    if not monitor.enabled:
        return None
    finetune = to_section(FinetuneConfig, _section(record, FINETUNE_SECTION))
    _check_finite(finetune, FINETUNE_SECTION)
    return monitor, finetune


def evaluation_to_metrics(evaluation: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``{task: {metric: {value, low, high}}}`` as flat reply metrics (``eval/task/metric``)."""
    flat: dict[str, float] = {}
    for task, metrics in evaluation.items():
        for metric, estimate in metrics.items():
            key = f"{EVAL_METRIC_PREFIX}{task}/{metric}"
            flat[key] = float(estimate["value"])
            flat[f"{key}/low"] = float(estimate["low"])
            flat[f"{key}/high"] = float(estimate["high"])
    return flat


_EVAL_BOUNDS = ("low", "high")


def metrics_to_evaluation(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]] | None:
    """Inverse of ``evaluation_to_metrics``; None when the reply carries no evaluation."""
    evaluation: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        if not key.startswith(EVAL_METRIC_PREFIX):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue  # a site's malformed metric is left out, never fatal to the coordinator
        *task_parts, last = key[len(EVAL_METRIC_PREFIX) :].split("/")
        bound = "value"
        if last in _EVAL_BOUNDS and task_parts:
            bound, last = last, task_parts.pop()
        if not task_parts:
            continue
        evaluation.setdefault("/".join(task_parts), {}).setdefault(last, {})[bound] = float(value)
    return evaluation or None
