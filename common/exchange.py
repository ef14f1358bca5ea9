"""What travels between coordinator and sites, and how it is checked on arrival.

This module IS the round contract (ARCHITECTURE.md, "The wire protocol"): change a key or
an encoding here and deployed sites break, so bump ``PROTOCOL_VERSION`` with it.

* Weights travel as Flower ``ArrayRecord``s keyed by the encoder's ``state_dict`` names (with
  ``train.share_heads`` also the SSL head's and centres', ``common.model.SHARED_HEAD_PREFIX``).
* A round's instructions are a ``RoundInstructions``; on the wire one flat ``ConfigRecord``
  (``RoundInstructions.to_record`` / ``from_record``, the only encoding). A site decodes
  it once, at the top of its ClientApp handler, and checks it against its own policy
  before touching data.
* A site's reply is a ``SiteReply``: a ``MetricRecord`` of numbers and a ``ConfigRecord``
  with its site id (``SiteReply.to_records`` / ``from_records``).

Key scheme, both directions:

* ``section.field`` (a dot): a config path, the value of exactly that field of
  ``common/config``'s ``RunConfig`` (``model.hidden_size`` is ``cfg.model.hidden_size``;
  nested sections nest further, ``privacy.local.delta``). Whole sections travel for
  ``model``, ``train``, ``privacy``, ``monitor`` and ``finetune``; single fields for
  ``federation.min_sites`` and ``federation.transport``. Nothing else has a dot.
* ``kebab-case`` (no dot): a protocol fact that is no config field: ``protocol-version``,
  ``server-round`` (Flower's FedAvg writes the same name), ``federation-id``, ``phase``,
  ``secure-aggregation``, the phase-2 round plan ``plan-*`` and a site's classifier base
  (``full-state``, ``base-sha256``); every reply metric (``num-examples``, ``loss-first``,
  ``train-seconds``, ...; the data summary's ``data-summary-*`` in common/data_summary.py,
  the representation monitor's ``monitor-*`` in common/monitor.py).
* ``eval/<task>/<metric>[/low|/high]``: phase 2's held-out evaluation in a reply.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

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

# The round contract's version, in every instruction record and every reply. Bump it with
# any change to a key, a value's encoding or a section's fields that travels.
# 2: instructions carry ``federation-id`` (a site of version 1 would refuse it as unknown).
# 3: the privacy section carries ``privacy.distributed`` (distributed DP).
PROTOCOL_VERSION = 3
PROTOCOL_VERSION_KEY = "protocol-version"

# Record names in a message's RecordDict; one definition so a rename cannot split them.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
LOCAL_STATE_KEY = "ssl-local-state"  # a site's context.state, never sent
# Run config key naming the run folder (ServerApp: results; simulated sites: state folders).
RUN_DIR_KEY = "run-dir"
# An empty query a simulation's coordinator sends every site before round 1 (server/collect.py
# ``warm_up_sites``): its reply carries nothing; it only makes the site's process start.
WARMUP_ACTION = "warmup"
WARMUP_MESSAGE_TYPE = f"query.{WARMUP_ACTION}"

# --- Round instructions (the CONFIG_KEY record) --------------------------------------
# Config sections that travel whole, flattened as ``section.field``.
MODEL_SECTION = "model"
TRAIN_SECTION = "train"
PRIVACY_SECTION = "privacy"
# Phase 1: the representation monitor's settings, and (monitor on) the fine-tuning recipe
# whose split and pooling it follows. Phase 2: the recipe.
MONITOR_SECTION = "monitor"
FINETUNE_SECTION = "finetune"
# Single config fields.
MIN_SITES_KEY = "federation.min_sites"
TRANSPORT_KEY = "federation.transport"  # float format of a plain-path update (Transport)
# Protocol facts. A site's policy is checked against these before it reads any data.
SERVER_ROUND_KEY = "server-round"
PHASE_KEY = "phase"
# The federation's identity: made once when a run starts (results.json), kept by every resume,
# sent every round. A site keys the local training state it keeps on disk by it
# (client/local_state.py). Untrusted at the site: exactly FEDERATION_ID_HEX_DIGITS lowercase hex.
FEDERATION_ID_KEY = "federation-id"
FEDERATION_ID_HEX_DIGITS = 32  # 128 random bits: two federations never share one by chance
_FEDERATION_ID_PATTERN = re.compile(rf"[0-9a-f]{{{FEDERATION_ID_HEX_DIGITS}}}")
# Whether the coordinator aggregates this round securely (a claim; client/policy.py).
SECURE_AGGREGATION_KEY = "secure-aggregation"
PRETRAIN_PHASE = "pretrain"
FINETUNE_PHASE = "finetune"  # federated progressive-freezing fine-tuning (phase 2)
# Phase 2: the coordinator's plan for the round (common/finetune.FinetuneRoundPlan) and
# its local steps.
PLAN_STAGE_KEY = "plan-stage"
PLAN_BLOCKS_KEY = "plan-trainable-blocks"
PLAN_STEM_KEY = "plan-train-stem"
PLAN_SCHEDULE_START_KEY = "plan-schedule-start"
PLAN_SCHEDULE_TOTAL_KEY = "plan-schedule-total"
PLAN_LOCAL_STEPS_KEY = "plan-local-steps"
# Phase 2, per site: whether the arrays are the whole classifier (True) or only its
# trainable part, and the digest of the whole classifier the site must hold to complete it.
FULL_STATE_KEY = "full-state"
BASE_DIGEST_KEY = "base-sha256"

# --- Site replies (the METRICS_KEY and SITE_KEY records) -----------------------------
REPLY_SITE_ID_KEY = "site-id"  # in the SITE_KEY record, beside PROTOCOL_VERSION_KEY
NUM_EXAMPLES_KEY = "num-examples"  # FedAvg's weight (Flower reads this name)
LOSS_KEY = "loss"  # last step's loss; under DP the round's mean
LOSS_FIRST_KEY = "loss-first"
LOSSES_KEY = "losses"  # every step's
TRAIN_SECONDS_KEY = "train-seconds"
DATA_SECONDS_KEY = "data-seconds"
ROUND_SECONDS_KEY = "round-seconds"
BYTES_SENT_KEY = "bytes-sent"  # the update's payload bytes
PEAK_RSS_KEY = "peak-rss-mb"
# Local DP's epsilon (the site's own accountant, at privacy.local.delta). Central DP's clip
# scale (1.0: within the bound) is a name only: it stays in the site's audit log.
EPSILON_KEY = "dp-epsilon"
CLIP_SCALE_KEY = "dp-clip-scale"
# Phase 2: trainable parameter elements, and held-out evaluation values as
# ``eval/<task>/<metric>`` (point estimate) and ``.../low``, ``.../high`` (bootstrap CI).
TRAINABLE_PARAMETERS_KEY = "trainable-parameters"
EVAL_METRIC_PREFIX = "eval/"

# A site that declines a round replies with a Flower Error carrying one of these codes,
# and a reason that names the site (see refusal_reason).
POLICY_REFUSED_CODE = 4001  # also: instructions that do not decode, another protocol version
BUDGET_REFUSED_CODE = 4002
NO_LABELS_REFUSED_CODE = 4003  # phase 2 at a site without (enough) labelled scans
REFUSAL_CODES = (POLICY_REFUSED_CODE, BUDGET_REFUSED_CODE, NO_LABELS_REFUSED_CODE)

# Outcome of one site in one round (results.json).
STATUS_AGGREGATED = "aggregated"
STATUS_REJECTED = "rejected"  # the coordinator would not use the update
STATUS_FAILED = "failed"  # the site's ClientApp raised
STATUS_REFUSED = "refused"  # the site declined by its policy or privacy budget
STATUS_TIMEOUT = "timeout"  # no reply before federation.round_timeout_s
STATUS_DROPPED = "dropped"  # the SuperLink lost it, or it went silent during a secure-aggregation stage
# Secure aggregation only:
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


def new_federation_id() -> str:
    """A fresh federation identity (the coordinator's, when a run starts)."""
    return secrets.token_hex(FEDERATION_ID_HEX_DIGITS // 2)


def check_federation_id(value: Any, source: str = f"the instructions' '{FEDERATION_ID_KEY}'") -> str:
    """``value`` if it is a federation id (exactly FEDERATION_ID_HEX_DIGITS lowercase hex
    digits), else ConfigError naming ``source``. A site makes it part of a file path, so
    nothing else may pass: no separator, no dot, no other length."""
    if not isinstance(value, str) or _FEDERATION_ID_PATTERN.fullmatch(value) is None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{source} is {shown}, not {FEDERATION_ID_HEX_DIGITS} lowercase hex digits")
    return value


class IncompatibleProtocol(ConfigError):
    """A message of another (or no) protocol version; the message names both versions."""


def check_protocol_version(received: Any, sender: str, receiver: str) -> None:
    """Raise IncompatibleProtocol unless ``received`` is this side's ``PROTOCOL_VERSION``.

    ``sender`` / ``receiver`` name the two sides for the message ("coordinator", "site x")."""
    if received is None:
        raise IncompatibleProtocol(
            f"the {sender}'s message carries no '{PROTOCOL_VERSION_KEY}'; this {receiver} speaks ctfed protocol "
            f"version {PROTOCOL_VERSION} (the {sender} runs a ctfed from before versioned messages, or another program)"
        )
    if isinstance(received, bool) or not isinstance(received, int) or received != PROTOCOL_VERSION:
        raise IncompatibleProtocol(
            f"the {sender} speaks ctfed protocol version {received!r}, this {receiver} speaks version "
            f"{PROTOCOL_VERSION}: update the older side so both run the same protocol"
        )


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


def _check_finite(values: Mapping[str, Any], prefix: str) -> None:
    """Every float of a decoded section (nested sections and lists included) is finite."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            _check_finite(value, f"{prefix}.{key}")
        elif isinstance(value, (list, tuple)):
            if not all(math.isfinite(v) for v in value if isinstance(v, float)):
                raise ConfigError(f"received non-finite value in {prefix}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"received non-finite value for {prefix}.{key}")


def _decoded(schema: type, record: Mapping[str, Any], prefix: str) -> Any:
    """A config section from its ``prefix.*`` keys, validated and finite (ConfigError)."""
    section = to_section(schema, _section(record, prefix))
    _check_finite(asdict(section), prefix)
    return section


_REQUIRED = object()


def _value(record: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``record[key]`` as ``kind`` (ConfigError naming the key when it is missing and
    required, or not of that kind); ``default`` when it is missing and optional."""
    if key not in record:
        if default is _REQUIRED:
            raise ConfigError(f"the instructions lack '{key}'")
        return default
    value = record[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"the instructions' '{key}' is {value!r}, not an integer")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"the instructions' '{key}' is {value!r}, not true or false")
    if kind is list and not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"the instructions' '{key}' is {value!r}, not a list of integers")
    return kind(value)


_SECTIONS = (MODEL_SECTION, TRAIN_SECTION, PRIVACY_SECTION, MONITOR_SECTION, FINETUNE_SECTION)
_PLAN_KEYS = (PLAN_STAGE_KEY, PLAN_BLOCKS_KEY, PLAN_STEM_KEY, PLAN_SCHEDULE_START_KEY, PLAN_SCHEDULE_TOTAL_KEY, PLAN_LOCAL_STEPS_KEY)
_FACT_KEYS = frozenset(
    {PROTOCOL_VERSION_KEY, SERVER_ROUND_KEY, FEDERATION_ID_KEY, PHASE_KEY, SECURE_AGGREGATION_KEY, MIN_SITES_KEY,
     TRANSPORT_KEY, FULL_STATE_KEY, BASE_DIGEST_KEY, *_PLAN_KEYS}
)


@dataclass(frozen=True)
class RoundInstructions:
    """What the coordinator asks of a site in one round: the typed sections, decoded once.

    A field the coordinator leaves out of the record takes the default below, chosen to
    count against the round in a site's policy (min_sites 1, no DP, not secure)."""

    server_round: int
    model: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    phase: str = PRETRAIN_PHASE
    min_sites: int = 1  # federation.min_sites: the fewest sites an aggregate may have
    secure_aggregation: bool = False  # the coordinator's claim; the site trusts its own path
    transport: Transport = Transport.float32  # plain-path update format
    # Phase 1: the representation monitor (None: not asked); with it on, the recipe whose
    # split and pooling it follows. Phase 2: the recipe.
    monitor: MonitorConfig | None = None
    finetune: FinetuneConfig | None = None
    # Phase 2: the round's plan and its local steps (the policy counts these, not train's).
    plan: FinetuneRoundPlan | None = None
    plan_local_steps: int = 0
    # Phase 2, per site: whole classifier (True) or its trainable part over ``base_sha256``.
    full_state: bool = False
    base_sha256: str = ""
    # FEDERATION_ID_KEY; "" (not sent): the site keeps its local training state in memory only.
    federation_id: str = ""

    def monitor_settings(self) -> tuple[MonitorConfig, FinetuneConfig] | None:
        """The monitor and the recipe it follows; None when the coordinator asked for none."""
        if self.monitor is None or not self.monitor.enabled or self.finetune is None:
            return None
        return self.monitor, self.finetune

    def to_record(self) -> ConfigRecord:
        """The round's instructions as sent (the module docstring's key scheme)."""
        flat: dict[str, Any] = {PROTOCOL_VERSION_KEY: PROTOCOL_VERSION, SERVER_ROUND_KEY: int(self.server_round)}
        if self.federation_id:
            flat[FEDERATION_ID_KEY] = check_federation_id(self.federation_id)
        _flatten(MODEL_SECTION, self.model, flat)
        _flatten(TRAIN_SECTION, self.train, flat)
        _flatten(PRIVACY_SECTION, self.privacy, flat)
        flat.update(
            {
                PHASE_KEY: self.phase,
                MIN_SITES_KEY: int(self.min_sites),
                SECURE_AGGREGATION_KEY: bool(self.secure_aggregation),
                TRANSPORT_KEY: self.transport.value,
            }
        )
        if self.monitor is not None:
            _flatten(MONITOR_SECTION, self.monitor, flat)
        if self.finetune is not None:
            _flatten(FINETUNE_SECTION, self.finetune, flat)
        if self.plan is not None:
            flat.update(
                {
                    PLAN_STAGE_KEY: self.plan.stage,
                    PLAN_BLOCKS_KEY: [int(b) for b in self.plan.blocks],
                    PLAN_STEM_KEY: bool(self.plan.stem),
                    PLAN_SCHEDULE_START_KEY: int(self.plan.schedule_start),
                    PLAN_SCHEDULE_TOTAL_KEY: int(self.plan.schedule_total),
                    PLAN_LOCAL_STEPS_KEY: int(self.plan_local_steps),
                    FULL_STATE_KEY: bool(self.full_state),
                    BASE_DIGEST_KEY: self.base_sha256,
                }
            )
        return ConfigRecord(flat)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundInstructions":
        """Decode and validate a coordinator's record. IncompatibleProtocol for another or no
        protocol version; ConfigError naming the key for a missing, unknown or invalid one."""
        check_protocol_version(record.get(PROTOCOL_VERSION_KEY), "coordinator", "site")
        unknown = sorted(k for k in record if k not in _FACT_KEYS and k.split(".", 1)[0] not in _SECTIONS)
        if unknown:
            raise ConfigError(f"unknown instruction keys {unknown[:5]} (protocol version {PROTOCOL_VERSION})")
        phase = _value(record, PHASE_KEY, str, PRETRAIN_PHASE)
        federation_id = check_federation_id(record[FEDERATION_ID_KEY]) if FEDERATION_ID_KEY in record else ""
        try:
            transport = Transport(str(record.get(TRANSPORT_KEY, Transport.float32.value)))
        except ValueError:
            raise ConfigError(
                f"unknown {TRANSPORT_KEY} '{record[TRANSPORT_KEY]}' in the instructions; expected one of "
                f"{[t.value for t in Transport]}"
            ) from None
        has = {prefix: any(k.startswith(prefix + ".") for k in record) for prefix in (MONITOR_SECTION, FINETUNE_SECTION)}
        plan, plan_local_steps, full_state, base_sha256 = None, 0, False, ""
        if phase == FINETUNE_PHASE:
            if not has[FINETUNE_SECTION]:
                raise ConfigError(f"phase-2 instructions lack the '{FINETUNE_SECTION}.*' recipe")
            plan = FinetuneRoundPlan(
                stage=_value(record, PLAN_STAGE_KEY, str),
                blocks=tuple(_value(record, PLAN_BLOCKS_KEY, list)),
                stem=_value(record, PLAN_STEM_KEY, bool),
                schedule_start=_value(record, PLAN_SCHEDULE_START_KEY, int),
                schedule_total=_value(record, PLAN_SCHEDULE_TOTAL_KEY, int),
            )
            plan_local_steps = _value(record, PLAN_LOCAL_STEPS_KEY, int)
            if plan_local_steps < 1:
                raise ConfigError(f"phase-2 instructions ask for {plan_local_steps} local steps ({PLAN_LOCAL_STEPS_KEY})")
            full_state = _value(record, FULL_STATE_KEY, bool)
            base_sha256 = _value(record, BASE_DIGEST_KEY, str)
        return cls(
            server_round=_value(record, SERVER_ROUND_KEY, int),
            model=_decoded(ModelConfig, record, MODEL_SECTION),
            train=_decoded(TrainConfig, record, TRAIN_SECTION),
            privacy=_decoded(PrivacyConfig, record, PRIVACY_SECTION),
            phase=phase,
            min_sites=_value(record, MIN_SITES_KEY, int, 1),
            secure_aggregation=_value(record, SECURE_AGGREGATION_KEY, bool, False),
            transport=transport,
            monitor=_decoded(MonitorConfig, record, MONITOR_SECTION) if has[MONITOR_SECTION] else None,
            finetune=_decoded(FinetuneConfig, record, FINETUNE_SECTION) if has[FINETUNE_SECTION] else None,
            plan=plan,
            plan_local_steps=plan_local_steps,
            full_state=full_state,
            base_sha256=base_sha256,
            federation_id=federation_id,
        )

    @staticmethod
    def round_of(record: Mapping[str, Any]) -> int:
        """The server round a record names, for the audit entry of one that did not decode
        (0 when it names none)."""
        value = record.get(SERVER_ROUND_KEY)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    """A reply metric as a finite float; None when missing, not a number or not finite."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


_REPLY_KEYS = frozenset(
    {NUM_EXAMPLES_KEY, LOSS_KEY, LOSS_FIRST_KEY, LOSSES_KEY, TRAIN_SECONDS_KEY, DATA_SECONDS_KEY, ROUND_SECONDS_KEY,
     BYTES_SENT_KEY, PEAK_RSS_KEY, EPSILON_KEY, TRAINABLE_PARAMETERS_KEY}
)


@dataclass(frozen=True)
class SiteReply:
    """What a site sends back with its update (in clear, on both aggregation paths).

    None / empty fields are not sent. ``aggregates`` holds the aggregate metrics whose keys
    their own modules define (data summary ``data-summary-*``: common/data_summary.py;
    representation monitor ``monitor-*``: common/monitor.py): numbers only, no identifier."""

    site_id: str
    num_examples: int
    loss: float | None = None
    loss_first: float | None = None
    losses: tuple[float, ...] = ()
    train_seconds: float | None = None
    data_seconds: float | None = None
    round_seconds: float | None = None
    bytes_sent: int | None = None
    peak_rss_mb: float | None = None
    epsilon: float | None = None  # local DP, the site's own accountant
    trainable_parameters: int | None = None  # phase 2
    evaluation: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None  # phase 2: {task: {metric: {value, low, high}}}
    aggregates: Mapping[str, int | float] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The reply's MetricRecord values."""
        values: dict[str, Any] = {NUM_EXAMPLES_KEY: int(self.num_examples)}
        optional = {
            LOSS_KEY: self.loss, LOSS_FIRST_KEY: self.loss_first,
            LOSSES_KEY: [float(x) for x in self.losses] if self.losses else None,
            TRAIN_SECONDS_KEY: self.train_seconds, DATA_SECONDS_KEY: self.data_seconds,
            ROUND_SECONDS_KEY: self.round_seconds, BYTES_SENT_KEY: self.bytes_sent, PEAK_RSS_KEY: self.peak_rss_mb,
            TRAINABLE_PARAMETERS_KEY: self.trainable_parameters,
        }
        values.update({key: value for key, value in optional.items() if value is not None})
        values.update(self.aggregates)
        if self.evaluation:
            values.update(evaluation_to_metrics(self.evaluation))
        if self.epsilon is not None:
            values[EPSILON_KEY] = float(self.epsilon)
        return values

    def to_records(self) -> dict[str, MetricRecord | ConfigRecord]:
        """The reply's records beside its arrays: metrics, and the site record with the
        site id and the protocol version."""
        site = ConfigRecord({REPLY_SITE_ID_KEY: self.site_id, PROTOCOL_VERSION_KEY: PROTOCOL_VERSION})
        return {METRICS_KEY: MetricRecord(self.metrics()), SITE_KEY: site}

    @classmethod
    def from_metrics(cls, site_id: str, metrics: Mapping[str, Any]) -> "SiteReply":
        """A reply from the metrics a site sent. A value that is missing, not a number or
        not finite stays empty: a site's metrics cannot crash the coordinator."""
        losses = metrics.get(LOSSES_KEY)
        integer = lambda key: None if (value := _number(metrics, key)) is None else int(value)  # noqa: E731
        return cls(
            site_id=site_id,
            num_examples=integer(NUM_EXAMPLES_KEY) or 0,
            loss=_number(metrics, LOSS_KEY),
            loss_first=_number(metrics, LOSS_FIRST_KEY),
            losses=tuple(float(x) for x in losses if isinstance(x, (int, float))) if isinstance(losses, list) else (),
            train_seconds=_number(metrics, TRAIN_SECONDS_KEY),
            data_seconds=_number(metrics, DATA_SECONDS_KEY),
            round_seconds=_number(metrics, ROUND_SECONDS_KEY),
            bytes_sent=integer(BYTES_SENT_KEY),
            peak_rss_mb=_number(metrics, PEAK_RSS_KEY),
            epsilon=_number(metrics, EPSILON_KEY),
            trainable_parameters=integer(TRAINABLE_PARAMETERS_KEY),
            evaluation=metrics_to_evaluation(metrics),
            aggregates={
                key: value for key, value in metrics.items()
                if key not in _REPLY_KEYS and not key.startswith(EVAL_METRIC_PREFIX)
            },
        )

    @classmethod
    def from_records(cls, content: RecordDict, fallback_site_id: str) -> "SiteReply":
        """A site's reply content, decoded at the coordinator. IncompatibleProtocol for
        another or no protocol version; the metrics themselves are read leniently
        (``from_metrics``). ``fallback_site_id``: the name to use when none is sent."""
        site = content.config_records.get(SITE_KEY)
        check_protocol_version(None if site is None else site.get(PROTOCOL_VERSION_KEY), "site", "coordinator")
        assert site is not None
        metrics = content.metric_records.get(METRICS_KEY)
        site_id = str(site.get(REPLY_SITE_ID_KEY, fallback_site_id))
        return cls.from_metrics(site_id, metrics if metrics is not None else {})


def refusal_reason(site_id: str, reason: str) -> str:
    """An error reason that names the refusing site (an error reply carries no content)."""
    return f"site {site_id} refuses: {reason}"


def refusing_site(reason: str) -> str | None:
    """The site id ``refusal_reason`` put into ``reason``, if any."""
    prefix, sep, _ = reason.partition(" refuses: ")
    return prefix[len("site ") :] if sep and prefix.startswith("site ") else None


def evaluation_to_metrics(evaluation: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``{task: {metric: {value, low, high}}}`` as flat reply metrics (``eval/task/metric``;
    a metric without a confidence interval, such as the operating point, sends its value only)."""
    flat: dict[str, float] = {}
    for task, metrics in evaluation.items():
        for metric, estimate in metrics.items():
            key = f"{EVAL_METRIC_PREFIX}{task}/{metric}"
            flat[key] = float(estimate["value"])
            for bound in _EVAL_BOUNDS:
                if bound in estimate:
                    flat[f"{key}/{bound}"] = float(estimate[bound])
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
