"""Which site this ClientApp is, and where its prepared cache lives.

In a deployment the hospital's SuperNode says so in its node config
(``--node-config 'data-path="/data/cache" site-id="hospital-a"'``). In Flower's simulation
engine every virtual node gets a ``partition-id`` instead, which selects one of the prepared
caches under the run config's ``data-dir``.

Each site also has a *state folder* for what must outlive a process: its privacy ledger
(``privacy_ledger.json``), audit log (``audit.jsonl``) and local training state of the last
rounds (``local_state/<federation id>/``, client/local_state.py).

* deployed: the node config's ``state-dir`` (``ctfed site`` passes ``SiteConfig.state_path``);
* simulation: ``<run-dir>/sites/<site id>/`` (``ctfed simulate`` passes ``run-dir``);
* ``flwr run`` without a run folder: ``<tmp>/ctfed-sites/run-<run id>/<site id>/``, which
  lasts only as long as the machine's temporary files.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from ctfed.common.config import ConfigError
from ctfed.common.exchange import RUN_DIR_KEY
from ctfed.common.preprocess import MANIFEST, CachedVolumes

DATA_PATH_KEY = "data-path"
SITE_ID_KEY = "site-id"
DATA_DIR_KEY = "data-dir"
PARTITION_ID_KEY = "partition-id"
STATE_DIR_KEY = "state-dir"  # node config (deployed site)
SITES_DIR = "sites"


@dataclass(frozen=True)
class SiteIdentity:
    """Who this node is and where its files are, found without reading any scan."""

    site_id: str
    index: int
    cache_dir: Path
    state_dir: Path


@dataclass
class SiteData:
    site_id: str
    index: int
    cache_dir: Path
    dataset: CachedVolumes


def site_cache_dirs(data_dir: Path) -> list[Path]:
    """The prepared caches under a folder, one per site, in a stable order."""
    if not data_dir.is_dir():
        raise ConfigError(f"data-dir {data_dir} is not a folder")
    caches = sorted(p.parent for p in data_dir.glob(f"*/{MANIFEST}"))
    if not caches:
        raise ConfigError(f"no prepared site caches (*/{MANIFEST}) under {data_dir}")
    return caches


def identify_site(context: Context) -> SiteIdentity:
    """This node's site id, cache folder and state folder, from its node or run config.

    Reads no scan: a deployed site only parses its node config; a simulated one lists the
    cache folders under ``data-dir``.
    """
    node_config = context.node_config
    if DATA_PATH_KEY in node_config:
        cache_dir = Path(str(node_config[DATA_PATH_KEY]))
        site_id = str(node_config.get(SITE_ID_KEY, cache_dir.name))
        index = 0
    elif PARTITION_ID_KEY in node_config:
        index = int(node_config[PARTITION_ID_KEY])
        data_dir = str(context.run_config.get(DATA_DIR_KEY, ""))
        if not data_dir:
            raise ConfigError(f"simulation run has no '{DATA_DIR_KEY}' in its run config")
        caches = site_cache_dirs(Path(data_dir))
        if index >= len(caches):
            raise ConfigError(
                f"simulated node {index} has no cache: {len(caches)} site caches under {data_dir}"
            )
        cache_dir = caches[index]
        site_id = cache_dir.name
    else:
        raise ConfigError(
            f"node config names no site data: set '{DATA_PATH_KEY}' (and '{SITE_ID_KEY}') "
            "when starting the SuperNode"
        )
    return SiteIdentity(site_id=site_id, index=index, cache_dir=cache_dir, state_dir=site_state_dir(context, site_id))


def site_state_dir(context: Context, site_id: str) -> Path:
    """The site's state folder (see the module docstring); not created here."""
    state_dir = str(context.node_config.get(STATE_DIR_KEY, ""))
    if state_dir:
        return Path(state_dir)
    run_dir = str(context.run_config.get(RUN_DIR_KEY, ""))
    if run_dir:
        return Path(run_dir) / SITES_DIR / site_id
    return Path(tempfile.gettempdir()) / "ctfed-sites" / f"run-{context.run_id}" / site_id


def open_site_data(identity: SiteIdentity) -> SiteData:
    """Open the site's cache (reads its manifest)."""
    return SiteData(
        site_id=identity.site_id, index=identity.index, cache_dir=identity.cache_dir,
        dataset=CachedVolumes(identity.cache_dir),
    )


def resolve_site(context: Context) -> SiteData:
    """Find this node's site identity and cache from its node or run config."""
    return open_site_data(identify_site(context))
