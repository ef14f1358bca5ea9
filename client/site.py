"""Which site this ClientApp is, and where its prepared cache lives.

In a deployment the hospital's SuperNode says so in its node config
(``--node-config 'data-path="/data/cache" site-id="hospital-a"'``). In Flower's simulation
engine every virtual node gets a ``partition-id`` instead, which selects one of the prepared
caches under the run config's ``data-dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from ctfed.common.config import ConfigError
from ctfed.common.preprocess import MANIFEST, CachedVolumes

DATA_PATH_KEY = "data-path"
SITE_ID_KEY = "site-id"
DATA_DIR_KEY = "data-dir"
PARTITION_ID_KEY = "partition-id"


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


def resolve_site(context: Context) -> SiteData:
    """Find this node's site identity and cache from its node or run config."""
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
    return SiteData(site_id=site_id, index=index, cache_dir=cache_dir, dataset=CachedVolumes(cache_dir))
