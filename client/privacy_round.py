"""The site's side of one round's privacy: policy, budget, clipping, ledger and audit.

``client/app.py`` drives a round through one ``SitePrivacyRound``:

1. ``check_policy()`` - before the cache is opened (raises RoundRefused);
2. ``check_budget()`` - local DP only: the epsilon the site *would* have after this round's
   planned steps, from its ledger, against ``policy.max_epsilon`` (raises RoundRefused);
3. training, with ``local_dp`` handed to LocalTrainer;
4. ``after_training()`` - records the steps taken in the ledger, returns reply metrics;
5. ``outgoing_update()`` - ``clip()`` (central DP only: the delta is clipped to
   ``privacy.central.clip_norm`` before it goes anywhere, plain or secure aggregation), then
   the cast to the round's ``federation.transport`` float format (plain path only);
6. ``audit_reply()`` / ``refuse()`` - every outgoing message is written to the audit log.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, Context, Error

from ctfed.client.audit import AUDIT_FILE, KIND_REFUSAL, KIND_TRAIN_REPLY, AuditLog
from ctfed.client.ledger import load_site_ledger, planned_local_entry, save_site_ledger
from ctfed.client.policy import PolicyViolation, check_instructions, load_site_policy
from ctfed.client.site import SiteIdentity
from ctfed.common.config import LocalDPConfig, PrivacyMode, SitePolicy, TrainConfig, Transport
from ctfed.common.dp import LedgerEntry, PrivacyBudgetExceeded, PrivacyLedger, clip_update
from ctfed.common.exchange import (
    BUDGET_REFUSED_CODE,
    CLIP_SCALE_KEY,
    EPSILON_KEY,
    POLICY_REFUSED_CODE,
    SECURE_AGGREGATION_KEY,
    SERVER_ROUND_KEY,
    encode_update,
    record_to_privacy,
    refusal_reason,
    transport_from_instructions,
)


class RoundRefused(RuntimeError):
    """The site declines this round; ``code`` is one of common.exchange.REFUSAL_CODES."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class SitePrivacyRound:
    """Policy, budget, DP bookkeeping and audit for one round at one site."""

    def __init__(self, identity: SiteIdentity, context: Context, instructions: Mapping[str, Any]) -> None:
        self.identity = identity
        self.context = context
        self.instructions = instructions
        self.server_round = int(instructions[SERVER_ROUND_KEY])
        self.run_id = str(context.run_id)
        self.audit = AuditLog(identity.state_dir / AUDIT_FILE)
        # Loading the policy is itself a check: a broken policy file is a ConfigError.
        self.policy: SitePolicy = load_site_policy(context.node_config, context.run_config, identity.site_id)
        self.privacy = record_to_privacy(instructions)
        self.ledger: PrivacyLedger | None = None
        self.planned: LedgerEntry | None = None
        self.clip_scale = 1.0

    @property
    def local_dp(self) -> LocalDPConfig | None:
        return self.privacy.local if self.privacy.mode is PrivacyMode.local else None

    def check_policy(self) -> None:
        try:
            check_instructions(self.policy, self.instructions)
        except PolicyViolation as err:
            raise RoundRefused(POLICY_REFUSED_CODE, str(err)) from None

    def check_budget(self, train: TrainConfig, num_volumes: int) -> None:
        if self.local_dp is None:
            return
        self.ledger = load_site_ledger(self.identity.state_dir, self.context)
        self.planned = planned_local_entry(self.local_dp, train, num_volumes, self.server_round, self.run_id)
        if self.policy.max_epsilon > 0:
            try:
                self.ledger.check_budget(self.planned, self.policy.max_epsilon, self.policy.delta)
            except PrivacyBudgetExceeded as err:
                raise RoundRefused(BUDGET_REFUSED_CODE, str(err)) from None

    def after_training(self, dp_steps: int) -> dict[str, Any]:
        """Record the round in the ledger (local DP); the privacy metrics of the reply.

        Call after ``clip`` (the metrics report its scale)."""
        metrics: dict[str, Any] = {}
        if self.local_dp is not None:
            assert self.ledger is not None and self.planned is not None, "check_budget must run first"
            entry = LedgerEntry(
                round=self.planned.round, noise_multiplier=self.planned.noise_multiplier,
                sample_rate=self.planned.sample_rate, steps=dp_steps, run_id=self.run_id,
            )
            self.ledger.record(entry)
            save_site_ledger(self.ledger, self.identity.state_dir, self.context)
            metrics[EPSILON_KEY] = self.ledger.epsilon(self.local_dp.delta)
        if self.privacy.mode is PrivacyMode.central:
            metrics[CLIP_SCALE_KEY] = self.clip_scale
        return metrics

    def clip(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Central DP: bound this site's update; other modes send it as it is."""
        if self.privacy.mode is not PrivacyMode.central:
            return delta
        clipped, self.clip_scale, _ = clip_update(delta, self.privacy.central.clip_norm)
        return clipped

    def dp_summary(self, epsilon: float | None = None) -> dict[str, Any]:
        summary: dict[str, Any] = {"mode": self.privacy.mode.value}
        if self.privacy.mode is PrivacyMode.local:
            summary.update(
                noise_multiplier=self.privacy.local.noise_multiplier,
                max_grad_norm=self.privacy.local.max_grad_norm,
                delta=self.privacy.local.delta,
                epsilon_after=epsilon,
            )
        elif self.privacy.mode is PrivacyMode.central:
            summary.update(
                clip_norm=self.privacy.central.clip_norm,
                clip_scale=self.clip_scale,
                noise_multiplier=self.privacy.central.noise_multiplier,
                noise_added_by="coordinator",
            )
        return summary

    @property
    def secure(self) -> bool:
        return bool(self.instructions.get(SECURE_AGGREGATION_KEY, False))

    @property
    def transport(self) -> Transport:
        """The update's float format on the wire. A secure round quantises the float32
        delta the site keeps, so the plain-path format does not apply to it."""
        return Transport.float32 if self.secure else transport_from_instructions(self.instructions)

    def outgoing_update(self, delta: dict[str, torch.Tensor]) -> ArrayRecord:
        """The reply's update: clipped (central DP), then cast to the round's transport format."""
        return encode_update(self.clip(delta), self.transport)

    def audit_reply(self, update: ArrayRecord, metrics: Mapping[str, Any]) -> None:
        held = self.secure
        self.audit.append(
            kind=KIND_TRAIN_REPLY, run_id=self.run_id, server_round=self.server_round,
            site_id=self.identity.site_id, arrays=update, metrics=metrics,
            dp=self.dp_summary(metrics.get(EPSILON_KEY)), transport=None if held else self.transport,
            # With secure aggregation the update described here stays at the site; only its
            # masked form leaves it (the secagg-masked_input entry of this round).
            reason="update held for secure aggregation; sent masked only" if held else "",
        )

    def refuse(self, refusal: RoundRefused) -> Error:
        """The error reply for a refusal (also written to the audit log)."""
        reason = refusal_reason(self.identity.site_id, str(refusal))
        self.audit.append(
            kind=KIND_REFUSAL, run_id=self.run_id, server_round=self.server_round,
            site_id=self.identity.site_id, dp=self.dp_summary(), reason=reason,
        )
        return Error(code=refusal.code, reason=reason)
