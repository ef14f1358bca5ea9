"""What a hospital owns: its SuperNode (``SiteConfig``, site.yaml) and its policy
(``SitePolicy``: what it takes part in, checked against every round's instructions)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from ctfed.common.config.errors import ConfigError

# The heartbeat intervals a Flower 1.41 SuperLink accepts (flwr.common.constant
# HEARTBEAT_MIN_INTERVAL / HEARTBEAT_MAX_INTERVAL; not imported: configs load without flwr).
HEARTBEAT_MIN_S = 10.0
HEARTBEAT_MAX_S = 1800.0


# Site ids (and sweep arm names) become file and folder names: keep them plain.
SITE_ID_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


# What a run is for; a site's policy lists the ones it takes part in.
PHASES = ("pretrain", "finetune")


# policy.local_dp_repeat_volumes: refuse a local-DP round, or train it on one volume per person.
REPEAT_VOLUME_RULES = ("refuse", "one_per_person")


@dataclass
class SitePolicy:
    """What a hospital's IT allows its site to take part in (``policy:`` in site.yaml).

    The defaults allow everything; every limit of 0 or an empty list means "no limit".
    The site checks each round's instructions against it before it reads any data.
    """

    # Phases the site takes part in: pretrain (phase 1, SSL) and/or finetune (phase 2).
    allowed_phases: list[str] = field(default_factory=lambda: list(PHASES))
    # Refuse every update that would leave the site on the plain path (in clear).
    require_secure_aggregation: bool = False
    # Refuse rounds whose aggregate may hold fewer sites than this (the coordinator's min_sites).
    min_sites: int = 1
    # Refuse rounds without differential privacy (local or central). Needs a bound on what
    # counts as DP (max_epsilon, max_round_epsilon or min_noise_multiplier): any noise at all
    # would otherwise meet it.
    require_dp: bool = False
    # Privacy budget over every round ever run, epsilon at ``delta``, computed by the site
    # itself from its own ledger of the mode in use (local: DP-SGD, a volume is the unit;
    # central: one entry per round, this site's whole update is the unit; docs/security.md).
    # A round that would take the site past it is refused. 0: no budget.
    max_epsilon: float = 0.0
    # The delta at which the site computes (and reports) every epsilon.
    delta: float = 1e-5
    # Largest epsilon (at ``delta``) one round may add on its own. 0: no limit.
    max_round_epsilon: float = 0.0
    # Smallest noise multiplier a DP round may use (privacy.local / privacy.central; for
    # privacy.distributed the multiplier of the noise the site counts on, its own times
    # sqrt(distributed_dp_honest_sites)). 0: none.
    min_noise_multiplier: float = 0.0
    # With require_dp: count only noise this site adds itself (local DP-SGD, or distributed DP
    # under secure aggregation), refusing central DP, whose noise the coordinator adds after
    # it has seen the clipped sum (nothing the site can check; docs/security.md, point 8).
    require_site_noise: bool = False
    # Distributed DP: how many sites' noise, this site's own included, the site counts on
    # being in every sum it joins, i.e. how many of the sites it trusts not to collude with
    # the coordinator. Its epsilon is accounted for that many sites' Skellam noise, whatever
    # the coordinator says; 1 relies on its own noise alone. At most min_sites.
    distributed_dp_honest_sites: int = 1
    # Largest delta a DP round may name in its config (privacy.*.delta). 0: no limit.
    max_delta: float = 0.0
    # Largest train.local_steps (x train.accumulation_steps: micro-batches) per round (0: any).
    max_local_steps: int = 0
    # model.name values allowed (empty: any), and size limits (0: any).
    allowed_models: list[str] = field(default_factory=list)
    # Largest model.hidden_size accepted (0: any).
    max_hidden_size: int = 0
    # Largest model.num_layers accepted (0: any).
    max_layers: int = 0
    # Send the model card's data summary (scan count, slice and spacing ranges, positives per
    # label) with each SSL round's metrics. Counts only, never an identifier; but they travel
    # in clear and outside any DP guarantee, so a site may keep them.
    share_data_summary: bool = True
    # Counts of the data summary below this (scans, labelled scans, positives per label, and
    # positives whose negatives are below it) are not sent: small cells single people out.
    # Its slice and spacing ranges end at the this-many-th scan from each end, rounded
    # outward, and the representation monitor of fewer labelled scans is not sent either, nor
    # phase 2's held-out evaluation of a task with fewer held-out positives or negatives.
    # 0 sends every count and the exact ranges. Figures that give a count away go only where
    # the count itself would (client/privacy_round.py shares_count): under local DP the
    # round's epsilon (its sample rate is batch_size / volumes) and its timings (they grow
    # with the Poisson-sampled batches).
    min_reported_count: int = 5
    # Send the representation monitor's numbers (kNN accuracy, feature spread and the number of
    # labelled scans behind them; common/monitor.py) with each SSL round's metrics. Aggregate
    # statistics of labelled scans, in clear and outside any DP guarantee, like the summary;
    # once per round, and on the secure path only with the round's unmask reply.
    share_monitor: bool = True
    # Also send the monitor on the plain path (no secure aggregation). There the site cannot
    # check that every site got the encoder it scores, so a coordinator can send this site
    # one of its own making and read the kNN accuracy as a label oracle, once a round.
    # Leave false unless the coordinator is trusted (ctfed simulate's sites: the researcher's).
    share_monitor_on_plain_path: bool = False
    # Under local DP a cache where one person has several volumes (follow-up studies, several
    # series of a study) would give that person a multiple of the round's epsilon (by group
    # privacy): "refuse" such rounds, or "one_per_person": train them on one volume per person
    # (patient pseudonym; study pseudonym without a PatientID), the first by content hash,
    # logging how many volumes were set aside. Without local DP every volume trains.
    local_dp_repeat_volumes: str = "refuse"
    # Under local DP, account every round as if the site trained on this many volumes (at
    # most as many as it does). DP-SGD's sample rate is batch_size / volumes, so with the real
    # count (0, the default) the epsilon, a budget refusal's figures and even whether the
    # budget refuses a round are functions of it: a coordinator that varies batch_size or
    # local_steps between rounds learns a bound on the count, a bit a round, from which rounds
    # the site refuses. With a number here they are functions of that number and of the
    # instructions only, so the epsilon goes with the reply (it tells the coordinator that the
    # site has at least this many). A volume's real chance of joining a batch is never above
    # the accounted rate, so the epsilon is an upper bound, looser the more volumes the site
    # has beyond this number.
    # A round with fewer volumes than this is refused (the accounting would not hold).
    local_dp_accounted_volumes: int = 0
    # Secure aggregation floor: reveal nothing unless the coordinator's reconstruction
    # threshold t exceeds this fraction of the site's neighbourhood n (t > f * n). Bonawitz
    # et al. need t > 2n/3 against a coordinator colluding with up to n/3 sites; at or below
    # n/2 a coordinator can tell two halves different survivor lists and rebuild both secrets.
    min_secagg_threshold_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        if self.local_dp_repeat_volumes not in REPEAT_VOLUME_RULES:
            raise ConfigError(
                f"policy.local_dp_repeat_volumes must be one of {', '.join(REPEAT_VOLUME_RULES)}, got {self.local_dp_repeat_volumes!r}"
            )
        unknown = sorted(set(self.allowed_phases) - set(PHASES))
        if unknown:
            raise ConfigError(f"policy.allowed_phases: unknown phases {unknown}; choose from {', '.join(PHASES)}")
        if self.min_sites < 1:
            raise ConfigError(f"policy.min_sites must be >= 1, got {self.min_sites}")
        if not 1 <= self.distributed_dp_honest_sites <= self.min_sites:
            raise ConfigError(
                f"policy.distributed_dp_honest_sites must be in [1, policy.min_sites={self.min_sites}] (the sum a site "
                f"joins holds at least min_sites sites), got {self.distributed_dp_honest_sites}"
            )
        if self.max_epsilon < 0:
            raise ConfigError(f"policy.max_epsilon must be >= 0 (0: no budget), got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"policy.delta must be in (0, 1), got {self.delta}")
        for name in ("max_round_epsilon", "min_noise_multiplier"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"policy.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not 0 <= self.max_delta < 1:
            raise ConfigError(f"policy.max_delta must be in [0, 1) (0: no limit), got {self.max_delta}")
        if self.require_dp and not (self.max_epsilon or self.max_round_epsilon or self.min_noise_multiplier):
            raise ConfigError(
                "policy.require_dp needs a bound on the privacy it accepts: set policy.max_epsilon, "
                "policy.max_round_epsilon or policy.min_noise_multiplier (any noise at all would meet it otherwise)"
            )
        for name in ("max_local_steps", "max_hidden_size", "max_layers", "min_reported_count"):
            if getattr(self, name) < 0:
                raise ConfigError(f"policy.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if self.local_dp_accounted_volumes < 0:
            raise ConfigError(
                f"policy.local_dp_accounted_volumes must be >= 0 (0: the real count), got {self.local_dp_accounted_volumes}"
            )
        if not 0.5 <= self.min_secagg_threshold_fraction < 1:
            raise ConfigError(
                "policy.min_secagg_threshold_fraction must be in [0.5, 1) (a threshold at or below half the "
                f"neighbourhood lets a coordinator rebuild both of a site's secrets), got {self.min_secagg_threshold_fraction}"
            )



@dataclass
class NamedSitePolicy(SitePolicy):
    """A simulated site's own policy (``simulation.site_policies``)."""

    # The site id this policy replaces the default for (its cache folder's name); required.
    site: str = ""


# An app bundle's SHA-256 as Flower writes it (hashlib's hexdigest: lowercase).
APP_HASH_RULE = re.compile(r"^[0-9a-f]{64}$")
_ADDRESS_RULE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass
class SiteConfig:
    """One hospital's SuperNode (``ctfed site --config site.yaml``; example in ``conf/site.yaml``).

    Relative paths are resolved against the YAML file's folder, so a site's folder can be
    moved as a whole. ``check_files`` is separate from ``__post_init__`` so a config can be
    validated for shape on a machine that does not hold the files.
    """

    # Name the coordinator knows this site by; appears in results.json.
    site_id: str = MISSING
    # A prepared cache (``ctfed prepare`` output): a folder with manifest.json.
    data_path: str = MISSING
    # SuperLink address as host:port; the host must be a name in the server certificate.
    superlink: str = MISSING
    # The federation CA certificate (``ca.crt`` from the coordinator).
    ca_cert: str = MISSING
    # This site's SuperNode auth key (OpenSSH EC private key from ``ctfed certs``).
    private_key: str = MISSING
    # This site's long-term secure-aggregation signing key (Ed25519, PEM; made AT the site by
    # ``ctfed site --make-signing-key``). It signs the site's key advertisements and survivor
    # sets. Empty: the site cannot authenticate itself and refuses secure-aggregation rounds.
    signing_key: str = ""
    # The federation roster pinned at this hospital: site id -> Ed25519 signing public key of
    # every site (YAML). Neighbours are verified against it, never against what the
    # coordinator forwards. Empty: the site refuses secure-aggregation rounds.
    roster: str = ""
    # Folder for the SuperNode's log, Flower home, privacy ledger and audit log (the site's
    # state folder: back it up, never delete it: the ledger is the site's privacy budget).
    # Empty: ``<data_path>/../ctfed-site-<site_id>``, visible beside the cache (a folder from an
    # older ctfed, ``.ctfed-site-<site_id>``, is still used where it exists).
    state_dir: str = ""
    # Local port of the SuperNode's Runtime API (127.0.0.1 only). 0: any free port, so
    # several SuperNodes can share one machine.
    runtime_port: int = 0
    # Give up (exit with the reason) when the SuperLink cannot be reached for this many
    # seconds: long enough for a coordinator restart, short enough that a wrong address does
    # not retry forever. 0: keep trying (e.g. under a supervisor that must never see an exit).
    max_wait_s: float = 600.0
    # Seconds between this SuperNode's heartbeats to the SuperLink (Flower's 30 by default).
    # The SuperLink counts a site as gone after two missed ones, and only then answers the
    # messages it waits for with "node unavailable": a shorter interval lets a round drop a
    # dead site sooner, at one small request per interval. Flower accepts 10 to 1800.
    heartbeat_interval_s: float = 30.0
    # SHA-256 digests (64 lowercase hex) of the app bundles this site agrees to run: a bundle
    # the coordinator submits with any other hash is never stored or run (Flower's INVALID_FAB
    # error is the reply). Get the value from a checkout the hospital reviewed with
    # ``ctfed site --app-hash DIR``, never from the coordinator alone. Empty: the site runs
    # ANY code the coordinator submits, its policy, DP and audit included (warned at start).
    trusted_app_hashes: list[str] = field(default_factory=list)
    # What this site takes part in; checked against every round's instructions.
    policy: SitePolicy = field(default_factory=SitePolicy)

    def __post_init__(self) -> None:
        if MISSING in (self.site_id, self.data_path, self.superlink, self.ca_cert, self.private_key):
            # Only the bare schema (for error hints) has them; OmegaConf reports a config
            # that leaves one out as a missing mandatory value before we get here.
            return
        if not SITE_ID_RULE.match(self.site_id):
            raise ConfigError(
                f"site.site_id '{self.site_id}' must be letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit, at most 63 characters)"
            )
        match = _ADDRESS_RULE.match(self.superlink)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ConfigError(
                f"site.superlink '{self.superlink}' must be host:port without a URL scheme, e.g. 'fl.example.org:8000'"
            )
        for name in ("data_path", "ca_cert", "private_key"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"site.{name} must not be empty")
        if not 0 <= self.runtime_port < 65536:
            raise ConfigError("site.runtime_port must be in [0, 65535] (0: a free port)")
        if self.max_wait_s < 0:
            raise ConfigError("site.max_wait_s must be >= 0 (0: keep trying)")
        if not HEARTBEAT_MIN_S <= self.heartbeat_interval_s <= HEARTBEAT_MAX_S:
            raise ConfigError(
                f"site.heartbeat_interval_s must be in [{HEARTBEAT_MIN_S:g}, {HEARTBEAT_MAX_S:g}] (the SuperLink refuses "
                f"other intervals), got {self.heartbeat_interval_s:g}"
            )
        for digest in self.trusted_app_hashes:
            if not isinstance(digest, str) or not APP_HASH_RULE.match(digest):
                raise ConfigError(
                    f"site.trusted_app_hashes: {digest!r} is not a SHA-256 hex digest (64 lowercase hex "
                    "characters, as 'ctfed site --app-hash DIR' prints it)"
                )

    def resolve_paths(self, base: Path) -> None:
        """Make relative paths absolute against ``base`` (the config file's folder)."""
        for name in ("data_path", "ca_cert", "private_key", "state_dir", "signing_key", "roster"):
            value = str(getattr(self, name))
            if value:
                setattr(self, name, str((base / Path(value).expanduser()).resolve()))

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        visible = Path(self.data_path).parent / f"ctfed-site-{self.site_id}"
        hidden = visible.with_name("." + visible.name)  # the earlier default: its ledger must not be lost
        return hidden if hidden.is_dir() and not visible.exists() else visible

    def check_files(self) -> None:
        """Fail before anything starts if a file the SuperNode needs is missing or unusable."""
        from ctfed.common.preprocess import MANIFEST  # heavy import (torch): only when checking

        data = Path(self.data_path)
        if not data.is_dir():
            raise ConfigError(f"site.data_path {data} is not a folder; run 'ctfed prepare --output {data}' first")
        if not (data / MANIFEST).is_file():
            raise ConfigError(
                f"site.data_path {data} has no {MANIFEST}: it is not a prepared cache; "
                f"run 'ctfed prepare --input <dicom> --output {data}'"
            )
        for name, what in (("ca_cert", "CA certificate"), ("private_key", "SuperNode private key")):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ConfigError(f"site.{name}: {what} {path} not found (the coordinator sends it; see 'ctfed certs')")
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        try:
            x509.load_pem_x509_certificates(Path(self.ca_cert).read_bytes())
        except ValueError as err:
            raise ConfigError(f"site.ca_cert {self.ca_cert} is not a PEM certificate: {err}") from None
        key_path = Path(self.private_key)
        try:
            key = load_ssh_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"site.private_key {key_path} is not an unencrypted OpenSSH private key ({err}); "
                "use the <site>.key file from 'ctfed certs'"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"site.private_key {key_path}: Flower needs an EC (NIST curve) key")
        if key_path.stat().st_mode & 0o077:
            raise ConfigError(f"site.private_key {key_path} is readable by others; run 'chmod 600 {key_path}'")
        if self.signing_key or self.roster:
            from ctfed.common.certs import check_site_signing  # keys module: only when checking

            check_site_signing(self.site_id, self.signing_key, self.roster)
