"""The coordinator's side of secure aggregation: one SecAgg+ round over ``grid.send_and_receive``.

Stages (sites' handlers in client/secagg.py, maths in common/secagg.py):
(a) train: sites train, keep their delta, reply metrics and a signed advertisement (two
    public keys, site id, model and instruction hashes);
(b) share keys: each site gets its neighbours' advertisements as they were signed and the
    round's threshold, verifies them against its own roster, replies encrypted shares;
(c) masked input: shares are routed to their addressees, sites reply masked vectors,
    which the coordinator only ever adds up;
(d) consistency: every site that sent a masked input gets the survivor set (those sites)
    and replies its signature over it (Bonawitz et al. 2017);
(e) unmask: sites get their neighbours' signatures and reply shares (and the representation
    monitor they held back since (a), client/monitor_round.py); the coordinator
    rebuilds survivors' self-mask seeds and dropped sites' pairwise keys, removes those
    masks from the sum and divides by the summed weights.

The coordinator verifies nothing of the signatures: it is the party they protect against.
Sites refuse at (b), (d) or (e) when their checks fail (the reason is in the round record).
A site may drop at any stage. While every surviving site (and every site dropped after
(b)) still has ``threshold`` live neighbours, the round completes with the sites whose
masked input arrived; otherwise it is not aggregated and says why.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from ctfed.common import secagg as sa
from ctfed.common.monitor import MONITOR_PREFIX
from ctfed.common.config import PrivacyMode, RunConfig
from ctfed.common.exchange import (
    METRICS_KEY,
    REFUSAL_CODES,
    STATUS_AGGREGATED,
    STATUS_DROPPED,
    STATUS_FAILED,
    STATUS_NOT_AGGREGATED,
    STATUS_REFUSED,
    IncompatibleProtocol,
    SiteReply,
    refusing_site,
)
from ctfed.server.replies import LOST_REASON, destinations, replying_node, site_lost
from ctfed.server.results import SiteRoundRecord, site_record

logger = logging.getLogger(__name__)


# Transient states of a site within one secure round; the record gets a STATUS_* value.
_PENDING = "pending"
_INCLUDED = "included"  # its masked input is in the sum, but it went silent at unmask
# Seconds between passes over the replies still missing (Flower's own grids poll every 0.1 s).
_PULL_INTERVAL_S = 0.05


# Stage (b) list -> the advertisement field it forwards.
_ADVERT_LISTS = {
    sa.K_SITE_IDS: sa.K_SITE_ID,
    sa.K_MODEL_HASHES: sa.K_MODEL_HASH,
    sa.K_INSTRUCTIONS_HASHES: sa.K_INSTRUCTIONS_HASH,
    sa.K_SIGNATURES: sa.K_SIGNATURE,
}


class RoundAborted(RuntimeError):
    """Secure aggregation cannot complete this round; the message says why."""


@dataclass
class _Site:
    node_id: int
    site: str
    status: str = _PENDING  # until it fails, drops out, or the round ends
    reason: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    clipped: int = 0


@dataclass
class SecureRoundResult:
    """What one secure round produced: the mean delta (None: not aggregated) and per-site outcomes."""

    mean_delta: dict[str, torch.Tensor] | None
    sites: list[SiteRoundRecord]
    reason: str = ""
    total_weight: int = 0
    included_sites: int = 0


class SecureRound:
    """State of one round on the coordinator. It holds public keys, encrypted shares, the
    running SUM of masked vectors and reconstructed secrets, never one site's vector."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        server_round: int,
        like: Mapping[str, torch.Tensor],
        known_sites: dict[int, str] | None = None,
        uniform_weights: bool = False,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        # Site ids learnt in earlier rounds, so a site that fails before saying its id is named.
        self.known_sites = known_sites if known_sites is not None else {}
        distributed = cfg.privacy.mode is PrivacyMode.distributed
        # Central and distributed DP need every site weighted 1 (their sensitivity argument), not by examples.
        self.max_weight = 1 if uniform_weights or distributed else cfg.secagg.max_weight
        self.sa_cfg = cfg.secagg
        if distributed:  # the sites' noise is calibrated to privacy.distributed's grid; they check it
            clipping, levels = sa.distributed_dp_grid(cfg.privacy.distributed.clip_norm, cfg.privacy.distributed.granularity)
            self.sa_cfg = replace(cfg.secagg, clipping_range=clipping, quantization_range=levels)
        self.round = server_round
        # Names and shapes only (meta tensors): the round holds no copy of the global encoder,
        # which the caller may keep on disk while the sites train (server/rounds.py).
        self.like = shape_template(like)
        self.length = sa.state_size(like) + 1  # + the weight
        self.sites: dict[int, _Site] = {}
        self.pk1: dict[int, bytes] = {}
        self.pk2: dict[int, bytes] = {}
        self.neighbours: dict[int, list[int]] = {}
        self.adverts: dict[int, ConfigRecord] = {}  # the signed advertisements, forwarded as they came
        self.threshold = 0  # set once the neighbourhood size is known (after training)
        self.masked_sum: np.ndarray | None = None

    # -- messaging ---------------------------------------------------------------------------

    def _replies(self, messages: list[Message], timeout: float) -> Iterator[tuple[int, Message]]:
        """The stage's replies one at a time, each with its node (``replying_node``), so the
        coordinator holds one reply, never all.

        A Flower Grid (push/pull) is pulled one message id at a time: a pull inflates every
        reply it returns, and a masked input is a full vector. Grids without push/pull (the
        in-process one of tests and ``ctfed bench``) yield their replies lazily instead."""
        if not (hasattr(self.grid, "push_messages") and hasattr(self.grid, "pull_messages")):
            sent_to: dict[str, int] | None = None
            for reply in self.grid.send_and_receive(messages, timeout=timeout):
                sent_to = destinations(messages) if sent_to is None else sent_to  # ids exist once pushed
                yield replying_node(reply, sent_to), reply
                del reply  # before the next reply is made: only one alive at a time
            return
        pushed = list(self.grid.push_messages(messages))
        sent_to = {msg_id: int(m.metadata.dst_node_id) for msg_id, m in zip(pushed, messages) if msg_id}
        pending = [msg_id for msg_id in pushed if msg_id]
        del messages
        deadline = time.monotonic() + timeout
        while pending:
            arrived = False
            for msg_id in list(pending):
                for reply in self.grid.pull_messages([msg_id]):
                    if msg_id in pending:
                        pending.remove(msg_id)
                    arrived = True
                    yield replying_node(reply, sent_to), reply
                    del reply  # before the next pull: only one reply alive at a time
            if not pending or time.monotonic() >= deadline:
                return
            if not arrived:
                time.sleep(_PULL_INTERVAL_S)

    def _exchange_each(self, stage: str, contents: dict[int, RecordDict], timeout: float) -> Iterator[tuple[int, RecordDict]]:
        """Send one stage's messages; yields (node, content) of each good reply as it comes.
        Nodes that fail or stay silent are marked and leave the round (once all is consumed)."""
        messages = []
        for node_id, content in contents.items():
            self.sites[node_id].bytes_sent += sa.payload_bytes(content)
            messages.append(Message(content, dst_node_id=node_id, message_type=sa.message_type(stage), group_id=str(self.round)))
        heard: set[int] = set()  # replied, with an error or a good reply
        for node_id, reply in self._replies(messages, timeout):
            if node_id not in contents:
                continue
            heard.add(node_id)
            site = self.sites[node_id]
            if site_lost(reply):
                site.status, site.reason = STATUS_DROPPED, f"{stage}: {LOST_REASON}"
                logger.warning("round %d: site %s dropped at %s: %s", self.round, site.site, stage, LOST_REASON)
                continue
            if reply.has_error():
                reason = reply.error.reason or ""
                if reply.error.code in REFUSAL_CODES:
                    site.site = refusing_site(reason) or site.site
                    site.status, site.reason = STATUS_REFUSED, reason
                    logger.warning("round %d: site %s refused: %s", self.round, site.site, reason)
                else:
                    site.status, site.reason = STATUS_FAILED, f"{stage}: {reason}"
                    logger.warning("round %d: site %s failed at %s: %s", self.round, site.site, stage, reason)
                continue
            site.bytes_received += sa.payload_bytes(reply.content)
            content = reply.content
            del reply
            yield node_id, content
            del content
        for node_id in contents.keys() - heard:
            site = self.sites[node_id]
            site.status, site.reason = STATUS_DROPPED, f"no reply at {stage} within {timeout:.0f} s"
            logger.warning("round %d: site %s dropped at %s", self.round, site.site, stage)

    def _exchange(self, stage: str, contents: dict[int, RecordDict], timeout: float) -> dict[int, RecordDict]:
        """Send one stage's messages; returns the contents of the good replies by node
        (for stages whose replies are small; masked inputs go through ``_exchange_each``)."""
        return dict(self._exchange_each(stage, contents, timeout))

    def _drop(self, node_id: int, reason: str) -> None:
        site = self.sites[node_id]
        site.status, site.reason = STATUS_FAILED, reason
        logger.warning("round %d: site %s left the round: %s", self.round, site.site, reason)

    def _payload(self, node_id: int, stage: str, content: RecordDict) -> ConfigRecord | None:
        """The site's ``stage`` payload with every field there and typed; None once a site
        whose reply is malformed has been marked failed (a hostile site cannot end the round)."""
        try:
            return sa.checked_payload(content, sa.PROTOCOL_KEY, sa.REPLY_FIELDS[stage], f"{stage}: the site's reply")
        except sa.MalformedPayload as err:
            self._drop(node_id, str(err))
            return None

    def _keep_included(self, node_id: int) -> None:
        """A site that left after its masked input was summed: its input stays in the sum."""
        site = self.sites[node_id]
        site.status, site.reason = _INCLUDED, f"{site.reason or 'left the round'}; its input is in the sum"

    def _require_live_neighbours(self, alive: set[int], owners: set[int], stage: str) -> None:
        for owner in owners:
            live = len(set(self.neighbours[owner]) & alive)
            if live < self.threshold:
                raise RoundAborted(
                    f"after {stage}: site {self.sites[owner].site} has {live} live neighbours, "
                    f"reconstruction needs {self.threshold}"
                )

    # -- stages --------------------------------------------------------------------------

    def train(self, train_messages: list[Message]) -> set[int]:
        params = ConfigRecord(
            {
                sa.P_ROUND: self.round,
                sa.P_CLIPPING: float(self.sa_cfg.clipping_range),
                sa.P_QUANTIZATION: int(self.sa_cfg.quantization_range),
                sa.P_MODULUS_BITS: int(self.sa_cfg.modulus_bits),
                sa.P_MAX_WEIGHT: int(self.max_weight),
                sa.P_MAX_NORM: float(self.cfg.federation.max_update_norm),
            }
        )
        contents = {}
        for message in train_messages:
            node_id = int(message.metadata.dst_node_id)
            self.sites[node_id] = _Site(node_id, self.known_sites.get(node_id, f"node-{node_id}"))
            contents[node_id] = RecordDict({**dict(message.content.items()), sa.PARAMS_KEY: params})
        # The round owns the train messages: emptied, so the serialised global encoder they
        # carry is held only by what is pushed, and is freed with it after this stage.
        train_messages.clear()
        replies = self._exchange(sa.STAGE_TRAIN, contents, self.cfg.federation.round_timeout_s)
        del contents
        seen_keys: set[bytes] = set()
        for node_id, content in replies.items():
            site = self.sites[node_id]
            try:
                reply = SiteReply.from_records(content, fallback_site_id=site.site)
            except IncompatibleProtocol as err:
                self._drop(node_id, str(err))
                continue
            site.site = self.known_sites[node_id] = reply.site_id
            site.metrics = content.metric_records.get(METRICS_KEY) or {}
            keys = self._payload(node_id, sa.STAGE_TRAIN, content)
            if keys is None:
                continue
            pk1, pk2 = cast(bytes, keys[sa.K_PK1]), cast(bytes, keys[sa.K_PK2])
            if pk1 in seen_keys or pk2 in seen_keys or pk1 == pk2:
                self._drop(node_id, "public keys not unique")
                continue
            seen_keys |= {pk1, pk2}
            self.pk1[node_id], self.pk2[node_id] = pk1, pk2
            self.adverts[node_id] = keys
        alive = set(self.pk1)
        if len(alive) > self.sa_cfg.max_sites:
            raise RoundAborted(f"{len(alive)} sites exceed secagg.max_sites={self.sa_cfg.max_sites} (the sum could wrap)")
        shares = sa.effective_num_shares(self.sa_cfg.num_shares, len(alive))
        self.threshold = sa.round_threshold(self.sa_cfg.reconstruction_threshold, shares)
        if len(alive) < max(self.threshold, self.cfg.federation.min_sites) or shares < self.threshold:
            raise RoundAborted(
                f"{len(alive)} sites trained; secure aggregation needs at least "
                f"{max(self.threshold, self.cfg.federation.min_sites)} (reconstruction_threshold, min_sites)"
            )
        order = sorted(alive)
        random.SystemRandom().shuffle(order)  # neighbourhoods must not be predictable by sites
        self.neighbours = sa.neighbourhoods(order, shares)
        return alive

    def share_keys(self, alive: set[int]) -> tuple[set[int], dict[int, dict[int, bytes]]]:
        contents = {}
        for node_id in alive:
            ids = self.neighbours[node_id]
            contents[node_id] = RecordDict(
                {
                    sa.PROTOCOL_KEY: ConfigRecord(
                        {
                            sa.P_ROUND: self.round,
                            sa.K_NODE_IDS: ids,
                            sa.K_PK1_LIST: [self.pk1[n] for n in ids],
                            sa.K_PK2_LIST: [self.pk2[n] for n in ids],
                            sa.P_THRESHOLD: self.threshold,
                            **{
                                key: [self.adverts[n].get(field, b"" if field == sa.K_SIGNATURE else "") for n in ids]
                                for key, field in _ADVERT_LISTS.items()
                            },
                        }
                    )
                }
            )
        replies = self._exchange(sa.STAGE_SHARE_KEYS, contents, self.sa_cfg.stage_timeout_s)
        ciphertexts: dict[int, dict[int, bytes]] = {}  # destination -> source -> ciphertext
        for node_id, content in replies.items():
            payload = self._payload(node_id, sa.STAGE_SHARE_KEYS, content)
            if payload is None:
                continue
            destinations = [int(d) for d in cast(list, payload[sa.K_DESTINATIONS])]
            expected = set(self.neighbours[node_id]) - {node_id}
            if sorted(destinations) != sorted(expected) or len(destinations) != len(cast(list, payload[sa.K_CIPHERTEXTS])):
                self._drop(node_id, "share_keys: shares not addressed to exactly its neighbours")
                continue
            for dst, ciphertext in zip(destinations, cast(list, payload[sa.K_CIPHERTEXTS])):
                ciphertexts.setdefault(dst, {})[node_id] = ciphertext
        alive = {n for n in replies if self.sites[n].status != STATUS_FAILED}
        self._require_live_neighbours(alive, alive, sa.STAGE_SHARE_KEYS)
        return alive, ciphertexts

    def masked_input(self, alive: set[int], ciphertexts: dict[int, dict[int, bytes]]) -> set[int]:
        contents = {}
        for node_id in alive:
            sources = sorted(src for src in ciphertexts.get(node_id, {}) if src in alive)
            contents[node_id] = RecordDict(
                {
                    sa.PROTOCOL_KEY: ConfigRecord(
                        {
                            sa.P_ROUND: self.round,
                            sa.K_SOURCES: sources,
                            sa.K_CIPHERTEXTS: [ciphertexts[node_id][src] for src in sources],
                        }
                    )
                }
            )
        dtype = sa.uint_dtype(self.sa_cfg.modulus_bits)
        included: set[int] = set()
        # Each masked vector is added into the running sum as it arrives and dropped at once:
        # the coordinator holds the sum and at most one site's vector, read in place.
        for node_id, content in self._exchange_each(sa.STAGE_MASKED_INPUT, contents, self.sa_cfg.stage_timeout_s):
            payload = self._payload(node_id, sa.STAGE_MASKED_INPUT, content)
            if payload is None:
                continue
            try:
                vector = sa.array_view(content[sa.MASKED_KEY][sa.MASKED_ARRAY])
            except (KeyError, ValueError) as err:
                self._drop(node_id, f"masked input unreadable: {err}")
                continue
            if vector.dtype != dtype or vector.shape != (self.length,):
                self._drop(node_id, f"masked input has dtype {vector.dtype} and shape {vector.shape}")
                continue
            if self.masked_sum is None:
                self.masked_sum = vector.copy()
            else:
                np.add(self.masked_sum, vector, out=self.masked_sum)  # wraps: arithmetic mod 2**bits
            del vector
            self.sites[node_id].clipped = int(payload[sa.K_CLIPPED])
            included.add(node_id)
            del content
        return included

    def consistency(self, included: set[int]) -> dict[int, bytes]:
        """Stage (d): every site that sent a masked input signs the survivor set (those sites)."""
        survivors = sorted(included)
        contents = {
            node_id: RecordDict({sa.PROTOCOL_KEY: ConfigRecord({sa.P_ROUND: self.round, sa.K_SURVIVORS: survivors})})
            for node_id in included
        }
        signatures: dict[int, bytes] = {}
        for node_id, content in self._exchange(sa.STAGE_CONSISTENCY, contents, self.sa_cfg.stage_timeout_s).items():
            payload = self._payload(node_id, sa.STAGE_CONSISTENCY, content)
            if payload is not None:  # a site that signed nothing: its input stays in the sum (unmask)
                signatures[node_id] = cast(bytes, payload[sa.K_SIGNATURE])
        return signatures

    def unmask(self, masked: set[int], included: set[int]) -> np.ndarray:
        """Remove every remaining mask from the sum; ``masked`` completed (b), ``included`` (c)."""
        dropped = masked - included
        # Needed: each included site's seed and each dropped site's sk1, from live neighbours.
        self._require_live_neighbours(included, included | dropped, sa.STAGE_MASKED_INPUT)
        signatures = self.consistency(included)
        # Only sites that signed go on to reveal shares; the others' inputs stay in the sum.
        self._require_live_neighbours(set(signatures), included | dropped, sa.STAGE_CONSISTENCY)
        for node_id in included - signatures.keys():
            self._keep_included(node_id)
        contents = {}
        for node_id in signatures:
            signers = [n for n in self.neighbours[node_id] if n in signatures]
            contents[node_id] = RecordDict(
                {
                    sa.PROTOCOL_KEY: ConfigRecord(
                        {
                            sa.P_ROUND: self.round,
                            sa.K_SIGNERS: signers,
                            sa.K_SIGNATURES: [signatures[n] for n in signers],
                        }
                    )
                }
            )
        replies = self._exchange(sa.STAGE_UNMASK, contents, self.sa_cfg.stage_timeout_s)
        seed_shares: dict[int, list[bytes]] = {n: [] for n in included}
        sk1_shares: dict[int, list[bytes]] = {n: [] for n in dropped}
        for node_id, content in replies.items():
            payload = self._payload(node_id, sa.STAGE_UNMASK, content)
            if payload is None:
                self._keep_included(node_id)  # its masked input was summed: it stays in
                continue
            held = content.metric_records.get(METRICS_KEY)
            if held is not None:  # the monitor, sent only now: the round's model was the same for all
                site = self.sites[node_id]
                site.metrics = {
                    **dict(site.metrics), **{k: v for k, v in held.items() if k.startswith(MONITOR_PREFIX)}
                }
            hood = set(self.neighbours[node_id])
            for owner, share in zip(cast(list, payload[sa.K_SEED_OWNERS]), cast(list, payload[sa.K_SEED_SHARES])):
                if int(owner) in seed_shares and int(owner) in hood:
                    seed_shares[int(owner)].append(share)
            for owner, share in zip(cast(list, payload[sa.K_SK1_OWNERS]), cast(list, payload[sa.K_SK1_SHARES])):
                if int(owner) in sk1_shares and int(owner) in hood:
                    sk1_shares[int(owner)].append(share)
        # Sites that dropped here still had their masked input summed: they stay included.
        for node_id in signatures.keys() - replies.keys():
            self._keep_included(node_id)
        assert self.masked_sum is not None
        total = self.masked_sum  # masks come off in place, one keystream chunk at a time
        for owner, shares in {**seed_shares, **sk1_shares}.items():
            if len(shares) < self.threshold:
                raise RoundAborted(
                    f"unmask: {len(shares)} shares for site {self.sites[owner].site}, need {self.threshold}"
                )
        for owner, shares in seed_shares.items():
            seed = combine_shares(shares[: self.threshold])
            sa.apply_mask(total, seed, sign=-1, purpose=sa.PURPOSE_SELF, server_round=self.round)
        for owner, shares in sk1_shares.items():
            sk1 = bytes_to_private_key(combine_shares(shares[: self.threshold]))
            for other in set(self.neighbours[owner]) & included:
                secret = generate_shared_key(sk1, bytes_to_public_key(self.pk1[other]))
                # `other` added pairwise_sign(other, owner) * mask; the dropped owner never
                # sent the cancelling half, so take it out.
                sa.apply_mask(
                    total, secret, sign=-sa.pairwise_sign(other, owner), purpose=sa.PURPOSE_PAIRWISE, server_round=self.round
                )
        self.masked_sum = None
        return total

    # -- the whole round -------------------------------------------------------------------

    def run(self, train_messages: list[Message]) -> SecureRoundResult:
        included: set[int] = set()
        try:
            alive = self.train(train_messages)
            masked, ciphertexts = self.share_keys(alive)
            included = self.masked_input(masked, ciphertexts)
            if len(included) < self.cfg.federation.min_sites:
                raise RoundAborted(f"only {len(included)} masked inputs arrived (min_sites={self.cfg.federation.min_sites})")
            unmasked = self.unmask(masked, included)
            mean, total_weight = sa.decode_mean(unmasked, self.sa_cfg)
            del unmasked  # the float32 mean replaces the integer sum
            if not np.isfinite(mean).all():
                raise RoundAborted("the aggregate contains non-finite values")
            norm = sa.vector_norm(mean)
            if norm > self.cfg.federation.max_update_norm:
                raise RoundAborted(
                    f"the aggregate's norm {norm:.3g} exceeds federation.max_update_norm={self.cfg.federation.max_update_norm:g}"
                )
        except (RoundAborted, ValueError) as err:  # ValueError: shares that do not combine
            reason = str(err) if isinstance(err, RoundAborted) else f"unmask failed: {err}"
            logger.error("round %d: secure aggregation not completed: %s; the global encoder is unchanged", self.round, reason)
            for site in self.sites.values():
                if site.status in (_PENDING, _INCLUDED):
                    site.status, site.reason = STATUS_NOT_AGGREGATED, reason
            return SecureRoundResult(None, self._records(), reason=reason)
        for node_id in included:
            site = self.sites[node_id]
            note = site.reason if site.status == _INCLUDED else ""
            site.status, site.reason = STATUS_AGGREGATED, note
        delta = sa.unflatten_state(mean, self.like, copy=False)  # views of the one mean buffer
        logger.info(
            "round %d: securely aggregated %d sites (total weight %d, aggregate norm %.4g)",
            self.round, len(included), total_weight, norm,
        )
        return SecureRoundResult(delta, self._records(), total_weight=total_weight, included_sites=len(included))

    def _records(self) -> list[SiteRoundRecord]:
        records = []
        for site in self.sites.values():
            records.append(
                site_record(
                    SiteReply.from_metrics(site.site, site.metrics), site.status, reason=site.reason,
                    bytes_received=site.bytes_received, bytes_sent=site.bytes_sent, clipped_values=site.clipped,
                )
            )
        return sorted(records, key=lambda r: r.site)


def shape_template(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s names, shapes and dtypes as meta tensors (no data)."""
    return {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for name, tensor in state.items()}


def secure_round(
    grid: Grid,
    train_messages: list[Message],
    global_state: dict[str, torch.Tensor],
    cfg: RunConfig,
    server_round: int,
    known_sites: dict[int, str] | None = None,
    uniform_weights: bool = False,
) -> SecureRoundResult:
    """One SecAgg+ round; never raises for site failures (they are in the result).

    ``train_messages`` is emptied (the round owns them, see ``SecureRound.train``); of
    ``global_state`` only the names and shapes are kept."""
    return SecureRound(grid, cfg, server_round, global_state, known_sites, uniform_weights).run(train_messages)
