"""The Flower App Bundle (FAB) ships what the deployed ServerApp and ClientApp run, and nothing else.

The bundle is built by Flower's own ``build_fab_from_files`` (what ``flwr build`` and
``flwr run .`` call) from the repository, so ``fab-include``/``fab-exclude`` in pyproject.toml,
.gitignore and Flower's built-in rules apply exactly as they do for a user. Then:

* no simulation code (runtime, studies, benchmarks, synthetic data) is in it;
* it holds every module the two apps import, lazily imported ones included (a static scan of
  their imports), and no Python file they never import;
* laid out as the installed package (pyproject's ``package-dir``), it alone is enough to import
  both apps and compose the coordinator's default run config, in a fresh interpreter whose
  editable install of the repository is switched off.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_files

REPO = Path(__file__).resolve().parents[2]
# Flower's build uses pathspec's deprecated gitwildmatch patterns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
APP_MODULES = ("ctfed.server.app", "ctfed.client.app")


def _package_dirs() -> dict[str, str]:
    """``ctfed.<name>`` -> repository folder, as pyproject's ``[tool.setuptools] package-dir``."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(pyproject["tool"]["setuptools"]["package-dir"])


def _build_fab() -> dict[str, bytes]:
    """The repository's FAB as ``flwr build`` makes it: archive path -> contents."""
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(REPO):
        # .venv and .git are ignored by Flower anyway (.gitignore, built-in rules); walking
        # the virtual environment would only cost seconds.
        subfolders[:] = [name for name in subfolders if name not in {".venv", ".git"}]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():
                files[path.relative_to(REPO).as_posix()] = path
    fab, _ = build_fab_from_files(files)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _module_file(module: str, package_dirs: dict[str, str]) -> str | None:
    """The repository file that defines ``module`` (a package's ``__init__.py``), if any."""
    for package, folder in package_dirs.items():
        if module != package and not module.startswith(package + "."):
            continue
        base = REPO / folder / module[len(package):].lstrip(".").replace(".", "/")
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate.relative_to(REPO).as_posix()
    return None


def _static_import_closure(roots: tuple[str, ...]) -> set[str]:
    """Repository files of every ``ctfed`` module ``roots`` import, at any depth, lazy imports included."""
    package_dirs = _package_dirs()
    seen: set[str] = set()
    files: set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        path = _module_file(module, package_dirs)
        if path is None or module in seen:
            continue  # a name imported from a module (not a module itself), or done
        seen.add(module)
        files.add(path)
        parts = module.split(".")
        pending.extend(".".join(parts[:i]) for i in range(2, len(parts)))  # parent packages
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.Import):
                pending.extend(alias.name for alias in node.names if alias.name.startswith("ctfed."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctfed."):
                pending.append(node.module)
                pending.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return files


@pytest.fixture(scope="module")
def fab() -> dict[str, bytes]:
    return _build_fab()


def test_the_bundle_holds_no_simulation_study_bench_or_synthetic_data_code(fab: dict[str, bytes]) -> None:
    simulation_folder = _package_dirs()["ctfed.simulations"]
    shipped = [name for name in fab if name.startswith(simulation_folder + "/")]
    assert not shipped, f"simulation code in the Flower App Bundle: {shipped}"
    assert not [name for name in fab if name.startswith(("tests/", "docs/", "conf/preset/"))]
    assert "conf/simulate.yaml" not in fab


def test_the_bundle_holds_exactly_the_modules_the_two_apps_import(fab: dict[str, bytes]) -> None:
    from ctfed.common.config.loading import CONFIG_MODULE

    # Hydra imports the YAML package by name (initialize_config_module), not by an import statement.
    needed = _static_import_closure(APP_MODULES) | {_module_file(CONFIG_MODULE, _package_dirs())}
    assert "client/dp_sgd.py" in needed, "the scan must follow imports inside functions"
    shipped = {name for name in fab if name.endswith(".py")}
    assert not needed - shipped, f"the apps import modules the bundle lacks: {sorted(needed - shipped)}"
    # What ships runs: a module no app imports belongs in fab-exclude (or is dead code).
    assert not shipped - needed, f"the bundle ships modules no app imports: {sorted(shipped - needed)}"


_IMPORT_FROM_BUNDLE = r"""
import importlib, json, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
# The repository's editable install must not answer for a module the bundle lacks.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [str(root)] + [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()

for module in sys.argv[2:]:
    importlib.import_module(module)
from ctfed.common.config import load_run_config
cfg = load_run_config()  # Hydra composes conf/run.yaml and the model group from the bundle
try:
    importlib.import_module("ctfed.simulations.runtime.simulate")
    simulations = "importable"
except ModuleNotFoundError:
    simulations = "missing"
outside = sorted(
    name for name, module in sys.modules.items()
    if name.startswith("ctfed") and getattr(module, "__file__", None)
    and not Path(module.__file__).resolve().is_relative_to(root)
)
print(json.dumps({"outside": outside, "simulations": simulations, "rounds": cfg.federation.rounds}))
"""


def test_both_apps_import_from_the_bundle_alone(fab: dict[str, bytes], tmp_path: Path) -> None:
    bundle = tmp_path / "fab"
    for name, content in fab.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(content)
    # The installed package's layout: ctfed/<name> is the bundle's folder pyproject maps it from.
    site = tmp_path / "site" / "ctfed"
    site.mkdir(parents=True)
    for package, folder in _package_dirs().items():
        if (bundle / folder).is_dir():
            shutil.copytree(bundle / folder, site / package.removeprefix("ctfed."))

    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_FROM_BUNDLE, str(site.parent), *APP_MODULES, "ctfed.client.dp_sgd"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outside"] == [], f"modules imported from outside the bundle: {report['outside']}"
    assert report["simulations"] == "missing", "the check must not see the repository's simulations/"
    assert report["rounds"] >= 1


def test_common_client_and_server_never_import_the_simulations() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, ctfed.common.config, ctfed.common.cli, ctfed.client.app, ctfed.server.app; "
        "print(sorted(m for m in sys.modules if m.startswith('ctfed.simulations')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # No import statement either (the CLI's lazy dispatch names its subcommands' modules as strings).
    import re

    root = REPO
    statement = re.compile(r"^\s*(from ctfed\.simulations\S* import|import ctfed\.simulations)", re.MULTILINE)
    importers = [
        str(path.relative_to(root))
        for folder in ("common", "client", "server")
        for path in (root / folder).rglob("*.py")
        if statement.search(path.read_text(encoding="utf-8"))
    ]
    assert importers == []
