"""The site's side of one round's privacy: policy, budget, clipping, ledger and audit.

``client/app.py`` drives a round through one ``SitePrivacyRound``:

1. ``check_policy()`` - before the cache is opened (raises RoundRefused); whether the round
   is securely aggregated is the protocol path the message came on (``secure_path``), never
   an instruction flag;
2. ``privacy_units()`` - local DP only: at most one volume per patient (or study), so that
   DP-SGD's unit, a volume, is a person: the volumes to train on (one per person where the
   site's policy says so; raises RoundRefused otherwise);
3. ``check_budget()`` - local or central DP: the epsilon the site computes itself for this
   round alone and after it, from its own ledger of that mode and at ``policy.delta``,
   against ``policy.max_round_epsilon`` and ``policy.max_epsilon`` (raises RoundRefused);
4. training, with ``local_dp`` handed to LocalTrainer;
5. ``after_training()`` - records the round in the ledger, returns the reply's epsilon;
   ``released()`` - what of the reply (``common.exchange.SiteReply``) may leave the site;
6. ``outgoing_update()`` - ``clip()`` (central and distributed DP: the delta is clipped to
   the mode's ``clip_norm`` before it goes anywhere), then the cast to the round's
   ``federation.transport`` float format (plain path only); distributed DP also holds the
   noise the site will add under the masks (``common.secagg.NOISE_STATE_KEY``, read by
   ``client/secagg.handle_masked_input``);
7. ``audit_reply()`` / ``refuse()`` - every outgoing message is written to the audit log.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, Context, Error

from ctfed.client.audit import AUDIT_FILE, KIND_REFUSAL, KIND_TRAIN_REPLY, AuditLog
from ctfed.client.ledger import (
    load_site_ledger, planned_central_entry, planned_distributed_entry, planned_local_entry, save_site_ledger,
)
from ctfed.client.policy import PolicyViolation, check_instructions, load_site_policy
from ctfed.client.privacy_unit import (
    PATIENT_FIELD,
    STUDY_FIELD,
    PrivacyUnitViolation,
    check_one_volume_per_person,
    one_volume_per_person,
)
from ctfed.client.site import SiteIdentity
from ctfed.common.config import LocalDPConfig, PrivacyConfig, PrivacyMode, SitePolicy, TrainConfig, Transport
from ctfed.common.preprocess import CachedVolumes
from ctfed.common.data_summary import LABELLED_KEY, POSITIVE_PREFIX, SCANS_KEY, SLICES_KEYS, SPACING_KEYS
from ctfed.common.monitor import MONITOR_PREFIX, SCANS_KEY as MONITOR_SCANS_KEY
from ctfed.common.dp import LedgerEntry, PrivacyBudgetExceeded, PrivacyLedger, clip_update
from ctfed.common.secagg import NOISE_STATE_KEY, noise_record
from ctfed.common.exchange import (
    BUDGET_REFUSED_CODE,
    FINETUNE_PHASE,
    POLICY_REFUSED_CODE,
    RoundInstructions,
    SiteReply,
    encode_update,
    refusal_reason,
)

logger = logging.getLogger(__name__)


class RoundRefused(RuntimeError):
    """The site declines this round; ``code`` is one of common.exchange.REFUSAL_CODES.

    ``sent_reason``, when given, is what the error reply (and its audit entry) says instead of
    ``reason``: the site's own log keeps the full one, with figures the coordinator must not get."""

    def __init__(self, code: int, reason: str, sent_reason: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.sent_reason = sent_reason or reason


# policy.local_dp_repeat_volumes (common/config/site.py REPEAT_VOLUME_RULES).
ONE_PER_PERSON = "one_per_person"


def _attributed(entries: Sequence[Mapping[str, Any]]) -> bool:
    """Every entry names its person (a patient or a study pseudonym): one per person can be chosen."""
    return all(entry.get(PATIENT_FIELD) or entry.get(STUDY_FIELD) for entry in entries)


class SitePrivacyRound:
    """Policy, budget, DP bookkeeping and audit for one round at one site.

    ``secure_path``: the message came on stage (a) of secure aggregation (the update stays
    at the site and leaves it masked only), not on the plain ``train`` handler.
    """

    def __init__(
        self,
        identity: SiteIdentity,
        context: Context,
        instructions: RoundInstructions | None,
        *,
        secure_path: bool,
        server_round: int,
        instructions_error: str = "",
    ) -> None:
        """``instructions``: the round's, decoded by the ClientApp; None when they did not
        decode, ``instructions_error`` saying why (check_policy then refuses the round)."""
        self.identity = identity
        self.context = context
        self.instructions = instructions
        self.secure_path = secure_path
        self.server_round = server_round
        self.run_id = str(context.run_id)
        self.audit = AuditLog(identity.state_dir / AUDIT_FILE)
        # Loading the policy is itself a check: a broken policy file is a ConfigError.
        self.policy: SitePolicy = load_site_policy(context.node_config, context.run_config, identity.site_id)
        # Instructions that do not decode (another protocol version, an unknown key such as a
        # removed privacy.local.secure_rng, a value out of range) are a refusal by check_policy,
        # written to the audit log.
        self.instructions_error = instructions_error or ("" if instructions else "instructions: none decoded")
        self.privacy: PrivacyConfig = instructions.privacy if instructions else PrivacyConfig()
        self.ledger: PrivacyLedger | None = None
        self.planned: LedgerEntry | None = None
        self.clip_scale = 1.0
        self.epsilon_after: float | None = None
        # Local DP with a volume count this round's reply does not say (set by check_budget):
        # the timings grow with the Poisson-sampled batches, so they stay at the site, and so
        # does the epsilon unless it is accounted with a count of the site's own choosing
        # (``epsilon_reveals_withheld_count``).
        self.volume_count_withheld = False
        self._cached_volumes: int | None = None

    @property
    def epsilon_reveals_withheld_count(self) -> bool:
        """Local DP: the sample rate is batch_size / volumes, so the epsilon (and any figure
        derived from it) gives a withheld volume count away, unless the site accounts with a
        count of its own choosing (``policy.local_dp_accounted_volumes``)."""
        return self.volume_count_withheld and not self.policy.local_dp_accounted_volumes

    @property
    def local_dp(self) -> LocalDPConfig | None:
        return self.privacy.local if self.privacy.mode is PrivacyMode.local else None

    def check_policy(self) -> None:
        if self.instructions_error or self.instructions is None:
            raise RoundRefused(POLICY_REFUSED_CODE, self.instructions_error)
        try:
            check_instructions(self.policy, self.instructions, secure_path=self.secure_path)
        except PolicyViolation as err:
            raise RoundRefused(POLICY_REFUSED_CODE, str(err)) from None

    def privacy_units(self, dataset: CachedVolumes) -> CachedVolumes:
        """The volumes this round trains on. Local DP: one per person (``privacy_unit``), so a
        cache where one person has several is refused, or, with the site's
        ``policy.local_dp_repeat_volumes: one_per_person``, trained on one volume per person.
        Otherwise every volume."""
        self._cached_volumes = len(dataset)
        if self.local_dp is None:
            return dataset
        try:
            units = check_one_volume_per_person(dataset.entries)
        except PrivacyUnitViolation as err:
            if self.policy.local_dp_repeat_volumes != ONE_PER_PERSON or not _attributed(dataset.entries):
                raise RoundRefused(
                    POLICY_REFUSED_CODE,
                    f"{err}; or let the site train local-DP rounds on one volume per person "
                    f"(policy.local_dp_repeat_volumes: {ONE_PER_PERSON})",
                ) from None
            kept = one_volume_per_person(dataset.entries)
            logger.warning(
                "site %s: local DP trains on %d of %d cached volumes, one per person "
                "(policy.local_dp_repeat_volumes: %s); the other %d are set aside for this round",
                self.identity.site_id, len(kept), len(dataset), ONE_PER_PERSON, len(dataset) - len(kept),
            )
            dataset = dataset.subset(kept)
            units = check_one_volume_per_person(dataset.entries)  # holds by construction
        if units.by_study:
            logger.warning(
                "site %s: %d of %d cached volumes have no patient pseudonym (no PatientID, NIfTI, or a cache from "
                "before patient_key: re-run ctfed prepare), so for them local DP checks one volume per study; a "
                "patient with several studies among them has several units",
                self.identity.site_id, units.by_study, units.by_study + units.by_patient,
            )
        return dataset

    def check_budget(self, train: TrainConfig, num_volumes: int) -> None:
        """The site's own epsilon for this round and in total, at ``policy.delta``."""
        mode = self.privacy.mode
        if mode is PrivacyMode.none:
            return
        self.ledger = load_site_ledger(self.identity.state_dir, self.context, mode)
        if mode is PrivacyMode.local:
            assert self.local_dp is not None
            accounted = self.accounted_volumes(num_volumes)
            self.planned = planned_local_entry(self.local_dp, train, accounted, self.server_round, self.run_id)
            self.volume_count_withheld = not self.shares_volume_count(num_volumes)
        elif mode is PrivacyMode.distributed:
            self.planned = planned_distributed_entry(
                self.privacy.distributed, self.policy.distributed_dp_honest_sites, self.server_round, self.run_id
            )
        else:
            self.planned = planned_central_entry(self.privacy.central, self.server_round, self.run_id)
        delta = self.policy.delta
        if self.policy.max_round_epsilon > 0:
            alone = PrivacyLedger().epsilon(delta, self.planned)
            if alone > self.policy.max_round_epsilon:
                raise RoundRefused(
                    BUDGET_REFUSED_CODE,
                    f"privacy budget: this round alone ({mode.value} DP, noise multiplier "
                    f"{self.planned.noise_multiplier:g}, sample rate {self.planned.sample_rate:.4g}, "
                    f"{self.planned.steps} steps) would spend epsilon {alone:.4g} at delta {delta:g}, "
                    f"above policy.max_round_epsilon {self.policy.max_round_epsilon:g}",
                    self._budget_reason_sent("policy.max_round_epsilon"),
                )
        if self.policy.max_epsilon > 0:
            try:
                self.ledger.check_budget(self.planned, self.policy.max_epsilon, delta)
            except PrivacyBudgetExceeded as err:
                raise RoundRefused(
                    BUDGET_REFUSED_CODE, f"{err} ({mode.value} DP ledger)", self._budget_reason_sent("policy.max_epsilon")
                ) from None

    def accounted_volumes(self, num_volumes: int) -> int:
        """The volume count local DP accounts with: ``policy.local_dp_accounted_volumes`` where
        set (refusing a round with fewer real volumes, whose sample rate it would understate),
        else the real count."""
        accounted = self.policy.local_dp_accounted_volumes
        if not accounted:
            return num_volumes
        if num_volumes < accounted:
            raise RoundRefused(
                POLICY_REFUSED_CODE,
                f"local DP: this round trains on {num_volumes} volumes, fewer than policy.local_dp_accounted_volumes "
                f"{accounted}, so accounting with that count would understate the epsilon; lower it to at most "
                f"{num_volumes}",
                "local DP: policy.local_dp_accounted_volumes is above this site's volume count (figures withheld; "
                "the site's log has them)",
            )
        return accounted

    def shares_count(self, count: int) -> bool:
        """Whether the site's policy lets a count of its scans leave it: it shares its data
        summary (``policy.share_data_summary``) and the count is not below
        ``policy.min_reported_count``, the rule of the summary's own counts."""
        return self.policy.share_data_summary and count >= self.policy.min_reported_count

    def shares_volume_count(self, num_volumes: int) -> bool:
        """Whether this round's reply says how many volumes the site trains on anyway: its data
        summary's scan count is sent (``shares_count``) and equals ``num_volumes`` (one
        volume per person kept them all)."""
        return self.shares_count(num_volumes) and num_volumes == self._cached_volumes

    def _budget_reason_sent(self, knob: str) -> str:
        """A budget refusal's reason as the coordinator gets it: without the epsilon and sample
        rate when they would give away a volume count the site withholds."""
        if not self.epsilon_reveals_withheld_count:
            return ""
        return (f"privacy budget: this round would exceed {knob} (figures withheld: under local DP they give "
                f"away the volume count, which this site does not share; the site's log has them)")

    def after_training(self, dp_steps: int) -> float | None:
        """Record the round in the ledger (local or central DP); the epsilon the reply carries
        (local DP only, else None).

        ``dp_steps``: the DP-SGD steps taken (local DP). Call after ``clip``."""
        if self.privacy.mode is PrivacyMode.none:
            return None
        assert self.ledger is not None and self.planned is not None, "check_budget must run first"
        steps = dp_steps if self.privacy.mode is PrivacyMode.local else self.planned.steps
        self.ledger.record(replace(self.planned, steps=steps))
        save_site_ledger(self.ledger, self.identity.state_dir, self.context, self.privacy.mode)
        # The site's own number, at its own delta; not the coordinator's.
        self.epsilon_after = self.ledger.epsilon(self.policy.delta)
        # Central: the coordinator keeps its own ledger (results.json's central_epsilon); the
        # site's stricter one (sample rate 1) is in its audit log and state folder. The clip
        # scale (clip_norm / the update's exact norm) stays in the audit log too. Local and
        # distributed: the site's own epsilon is the only one there is; the reply carries it,
        # unless (local DP) it would give away a volume count the site withholds: then it stays
        # in the site's ledger and audit log.
        if self.privacy.mode is PrivacyMode.central:
            return None
        if self.epsilon_reveals_withheld_count:
            logger.info("site %s round %d: epsilon %.4g at delta %g kept at the site (under local DP it gives away "
                        "the volume count, which the site does not share)", self.identity.site_id, self.server_round,
                        self.epsilon_after, self.policy.delta)
            return None
        return self.epsilon_after

    def released(self, reply: SiteReply) -> SiteReply:
        """What of a round's reply may leave the site (issue #12, point 10; docs/security.md
        "What each reply value reveals" lists every value and the rule that governs it).

        * Data summary counts below ``policy.min_reported_count`` are dropped, and so is a
          positives count whose negatives (labelled - positive) are below it; so are the
          slice-count and spacing ranges when the scan count itself is dropped (the ranges are
          coarsened where they are made, ``common.data_summary.site_data_metrics``); and the
          representation monitor when it used fewer labelled scans than the floor.
        * Under DP (local or central), phase 1 and phase 2 alike:

          - no per-step loss: a step's loss is a figure of the one or two volumes in its batch,
            outside any DP guarantee; the per-step losses and the first one are dropped and the
            loss becomes the mean over the round's steps;
          - ``num-examples`` is ``expected_examples()``, what the instructions ask for (steps x
            batch size), not the exact count: under Poisson sampling that count is a sum of
            per-volume draws, and in phase 2 it is the exact number of labelled training scans;
          - no held-out evaluation (phase 2's ``eval/*``: AUROC and its CI, the operating point):
            each is a function of a handful of held-out scans' labels and predictions, which no
            DP mechanism here covers. The site logs it locally.
        * Under local DP, where the volume count stays at the site (``check_budget``), the
          timings and peak memory stay too: they grow with the Poisson-sampled batches, i.e.
          with the volume count (whether or not the epsilon is accounted with a count of the
          site's choosing, ``policy.local_dp_accounted_volumes``).
        """
        kept = dict(reply.aggregates)
        floor = self.policy.min_reported_count
        if floor:
            labelled = kept.get(LABELLED_KEY)
            for key in [k for k in kept if k in (SCANS_KEY, LABELLED_KEY) or k.startswith(POSITIVE_PREFIX)]:
                value = int(kept[key])
                small = value < floor
                if key.startswith(POSITIVE_PREFIX) and isinstance(labelled, int):
                    small = small or labelled - value < floor
                if small:
                    del kept[key]
            if SCANS_KEY not in kept:  # a range of fewer scans than the floor is too close to one scan
                for key in (*SLICES_KEYS, *SPACING_KEYS):
                    kept.pop(key, None)
            kept = self.released_monitor(kept)
        reply = replace(reply, aggregates=kept)
        if self.privacy.mode is not PrivacyMode.none:
            if reply.losses:
                reply = replace(reply, losses=(), loss_first=None, loss=sum(reply.losses) / len(reply.losses))
            expected = self.expected_examples()
            if expected is not None:
                reply = replace(reply, num_examples=expected)
            if reply.evaluation:
                reply = replace(reply, evaluation=None)
        if self.volume_count_withheld:
            reply = replace(reply, train_seconds=None, data_seconds=None, round_seconds=None, peak_rss_mb=None)
        return reply

    def released_monitor(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """``metrics`` without the representation monitor's values when it used fewer labelled
        scans than ``policy.min_reported_count``: a kNN accuracy over a few scans says how those
        few are labelled. Applied before a secure round holds the monitor back, too."""
        kept = dict(metrics)
        monitored = kept.get(MONITOR_SCANS_KEY)
        floor = self.policy.min_reported_count
        if floor and isinstance(monitored, int) and monitored < floor:
            for key in [k for k in kept if k.startswith(MONITOR_PREFIX)]:
                del kept[key]
        return kept

    def released_evaluation(
        self, evaluation: Mapping[str, Mapping[str, Any]], held_out_labels: torch.Tensor, task_names: Sequence[str]
    ) -> dict[str, Any]:
        """Phase 2's held-out evaluation without the tasks whose held-out positives or
        negatives are fewer than ``policy.min_reported_count``: an AUROC or an operating
        point over a few scans of one class says how those scans are labelled and scored.
        (Under DP none of it leaves, ``released``.)"""
        floor = self.policy.min_reported_count
        if not floor:
            return dict(evaluation)
        kept = {}
        for index, task in enumerate(task_names):
            column = held_out_labels[:, index]
            if task in evaluation and min(int((column == 1).sum()), int((column == 0).sum())) >= floor:
                kept[task] = evaluation[task]
        return kept

    def expected_examples(self) -> int | None:
        """The examples a round's instructions ask for, known before any data is read (phase 1:
        steps x micro-batches x batch size, the expected Poisson total under local DP; phase 2:
        the plan's steps x the recipe's batch size); None without instructions."""
        instructions = self.instructions
        if instructions is None:
            return None
        if instructions.phase == FINETUNE_PHASE and instructions.finetune is not None:
            return instructions.plan_local_steps * instructions.finetune.batch_size
        train = instructions.train
        return train.local_steps * train.accumulation_steps * train.batch_size

    def clip(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Central and distributed DP: bound this site's update; other modes send it as it is."""
        if self.privacy.mode not in (PrivacyMode.central, PrivacyMode.distributed):
            return delta
        clipped, self.clip_scale, _ = clip_update(delta, getattr(self.privacy, self.privacy.mode.value).clip_norm)
        return clipped

    def hold_noise(self) -> None:
        """Distributed DP on the secure path: the grid and noise of this round, from the
        instructions this site checked, for the masked-input stage to add under the masks."""
        dp = self.privacy.distributed
        self.context.state[NOISE_STATE_KEY] = noise_record(self.server_round, dp.clip_norm, dp.granularity, dp.noise_multiplier)

    def dp_summary(self) -> dict[str, Any]:
        epsilon = self.epsilon_after
        summary: dict[str, Any] = {"mode": self.privacy.mode.value}
        if self.privacy.mode is PrivacyMode.local:
            summary.update(
                noise_multiplier=self.privacy.local.noise_multiplier,
                max_grad_norm=self.privacy.local.max_grad_norm,
                delta=self.privacy.local.delta,
                epsilon_after=epsilon,
                epsilon_delta=self.policy.delta,
            )
        elif self.privacy.mode is PrivacyMode.central:
            summary.update(
                clip_norm=self.privacy.central.clip_norm,
                clip_scale=self.clip_scale,
                noise_multiplier=self.privacy.central.noise_multiplier,
                noise_added_by="coordinator",
                delta=self.privacy.central.delta,
                epsilon_after=epsilon,
                epsilon_delta=self.policy.delta,
            )
        elif self.privacy.mode is PrivacyMode.distributed:
            dp = self.privacy.distributed
            summary.update(
                clip_norm=dp.clip_norm,
                clip_scale=self.clip_scale,
                granularity=dp.granularity,
                noise_multiplier=dp.noise_multiplier,
                noise_added_by="this site (Skellam, under the masks)",
                honest_sites_counted=self.policy.distributed_dp_honest_sites,
                delta=dp.delta,
                epsilon_after=epsilon,
                epsilon_delta=self.policy.delta,
            )
        return summary

    @property
    def transport(self) -> Transport:
        """The update's float format on the wire. A secure round quantises the float32
        delta the site keeps, so the plain-path format does not apply to it."""
        if self.secure_path or self.instructions is None:
            return Transport.float32
        return self.instructions.transport

    def outgoing_update(self, delta: dict[str, torch.Tensor]) -> ArrayRecord:
        """The reply's update: clipped (central and distributed DP), then cast to the round's
        transport format; distributed DP holds its noise for the masked-input stage."""
        if self.privacy.mode is PrivacyMode.distributed:
            if not self.secure_path:  # check_policy refuses this before any training
                raise RoundRefused(POLICY_REFUSED_CODE, "privacy.mode=distributed on the plain train path")
            self.hold_noise()
        return encode_update(self.clip(delta), self.transport)

    def audit_reply(self, update: ArrayRecord, metrics: Mapping[str, Any]) -> None:
        # What the path does with the update, not what the instructions claim.
        held = self.secure_path
        self.audit.append(
            kind=KIND_TRAIN_REPLY, run_id=self.run_id, server_round=self.server_round,
            site_id=self.identity.site_id, arrays=update, metrics=metrics,
            dp=self.dp_summary(), transport=None if held else self.transport,
            # With secure aggregation the update described here stays at the site; only its
            # masked form leaves it (the secagg-masked_input entry of this round).
            reason="update held for secure aggregation; sent masked only" if held else "update sent in clear (plain train path)",
        )

    def refuse(self, refusal: RoundRefused) -> Error:
        """The error reply for a refusal (also written to the audit log)."""
        reason = refusal_reason(self.identity.site_id, refusal.sent_reason)
        self.audit.append(
            kind=KIND_REFUSAL, run_id=self.run_id, server_round=self.server_round,
            site_id=self.identity.site_id, dp=self.dp_summary(), reason=reason,
        )
        return Error(code=refusal.code, reason=reason)
