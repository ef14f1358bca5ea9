"""Every ``ctfed ...`` and ``python -m ctfed.<module> ...`` command in README.md and the user
docs is valid against the real code, checked without running the work (issue #16, "Done when").

Commands come from fenced ``bash`` blocks (a trailing backslash joins lines; ``for ...; do CMD;
done`` bodies, ``.ci/in-env``, ``taskset``, ``nice``, ``/usr/bin/time -v`` and ``VAR=value``
prefixes are unwrapped) and from inline code spans in the prose that start with ``ctfed `` or
``python -m ctfed.``. Each one is checked for:

- the subcommand existing in ``ctfed``'s own parser (``ctfed.common.cli._build_parser``) and the
  whole line parsing with it; a ``python -m`` module importing and its ``build_parser()`` parsing
  the line;
- its Hydra overrides (``key=value``) composing with the loader that subcommand uses
  (``load_simulation_config`` for ``simulate`` and label_signal's ``--train``,
  ``load_run_config`` for ``pretrain`` / ``finetune``), so unknown keys, bad values and missing
  presets fail here.

Placeholders (``DIR``, ``CKPT``, ``<site>``, ``[overrides]``, ``A\\|B`` alternatives, ...) are
replaced by dummy values first. Inline spans may be fragments that name a flag in prose
(``ctfed server --port``): for those an incomplete line (a missing value or required option) is
accepted, but an unknown subcommand, flag or override still fails. A command that cannot be
checked this way is listed in ``UNCHECKED`` with the reason; any other unchecked command fails.
The commands actually run end to end are run by tests/integration/test_readme_quickstart.py and
the integration tests it names; ``flwr`` lines are parsed there too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
# docs/configuration.md is generated from the structured configs; the other docs/ pages
# (ct-views-and-head.md, test-times.md, decisions/) hold no commands for users.
DOC_PAGES = tuple(
    REPO / name
    for name in (
        "README.md", "docs/deploy.md", "docs/simulate.md", "docs/studies.md", "docs/benchmarks.md",
        "docs/predict-and-export.md", "docs/security.md", "docs/privacy.md", "docs/synthetic-findings.md",
    )
)
FENCE = re.compile(r"^[ \t]*```(?P<info>[^\n`]*)\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
# An inline code span; it may wrap onto the next line of a paragraph.
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")

# Placeholder words of the docs and what stands in for them. Paths need not exist: only parsing
# and config composition run.
PLACEHOLDERS = {
    "DIR": "/tmp/ctfed-doc-dir", "RUN_DIR": "/tmp/ctfed-doc-run", "RUN": "/tmp/ctfed-doc-run",
    "CKPT": "/tmp/ctfed-doc.safetensors", "DICOM_DIR": "/tmp/ctfed-doc-dicom", "CACHE_DIR": "/tmp/ctfed-doc-cache",
    "C": "/tmp/ctfed-doc-cache", "O": "/tmp/ctfed-doc-out", "STATE": "/tmp/ctfed-doc-state",
    "VAR": "CTFED_CA_PASSPHRASE", "PART": "ingest", "NAME": "compare", "N": "3", "H": "0" * 64,
    "A": "hospital-a", "B": "hospital-b", "KEY.pub": "/tmp/hospital-a.pub",
}
ANGLE = re.compile(r"<[^<>\s]+>")
# `ctfed COMMAND --help`: every subcommand's help.
COMMAND_WORD = "COMMAND"


@dataclass(frozen=True)
class DocCommand:
    page: str
    line: int
    text: str
    inline: bool

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


# Commands that the checks below cannot validate, with why. Keyed by the command text as written.
# A NEW command that cannot be checked fails test_every_doc_command_is_valid until it is fixed or
# listed here; a listed command no longer in the docs fails test_unchecked_list_is_current.
UNCHECKED: dict[str, str] = {}


def _strip_wrappers(words: list[str]) -> list[str]:
    """Drop VAR=value assignments and the wrappers a doc line runs ctfed through."""
    while words:
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        elif words[0] == ".ci/in-env":
            words = words[1:]
        elif words[0] in ("/usr/bin/time", "time"):
            words = words[1:]
            while words and words[0].startswith("-"):
                words = words[1:]
        elif words[0] == "taskset" and len(words) > 2:
            words = words[3:] if words[1] == "-c" else words[2:]
        elif words[0] == "nice":
            words = words[3:] if len(words) > 2 and words[1] == "-n" else words[1:]
        else:
            break
    return words


def _is_doc_command(words: list[str]) -> bool:
    if not words:
        return False
    if words[0] == "ctfed":
        return True
    return len(words) > 2 and words[0] in ("python", "python3") and words[1] == "-m" and words[2].startswith("ctfed.")


def _shell_commands(line: str) -> list[str]:
    """A shell line's simple commands: `;`/`&&` separated, `do CMD` bodies unwrapped."""
    parts = []
    for part in re.split(r";|&&", line):
        part = part.strip()
        part = re.sub(r"^(do|then)\s+", "", part)
        if part and part not in ("done", "fi"):
            parts.append(part)
    return parts


def doc_commands() -> list[DocCommand]:
    """Every ctfed / python -m ctfed command of the doc pages, fenced and inline."""
    found = []
    for page in DOC_PAGES:
        text = page.read_text()
        name = str(page.relative_to(REPO))
        for match in FENCE.finditer(text):
            info = match.group("info").split()
            if not info or info[0] not in ("bash", "sh", "shell", "console"):
                continue
            first_line = text.count("\n", 0, match.start("body")) + 1
            body = match.group("body")
            # Join continued lines, keeping the line number of each command's first line.
            offset = 0
            for logical in re.split(r"(?<!\\)\n", body):
                line_no = first_line + offset
                offset += logical.count("\n") + 1
                line = logical.replace("\\\n", " ").strip()
                if not line or line.startswith("#"):
                    continue
                for command in _shell_commands(line):
                    try:
                        words = _strip_wrappers(shlex.split(command, comments=True))
                    except ValueError:
                        continue
                    if _is_doc_command(words):
                        found.append(DocCommand(name, line_no, command, inline=False))
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for match in INLINE.finditer(prose):
            span = " ".join(match.group(1).split())
            try:
                words = _strip_wrappers(shlex.split(span.replace("\\|", " \\| ")))
            except ValueError:
                words = []
            if _is_doc_command(words) and not span.startswith(("ctfed:", "ctfed.")) and len(words) > 1:
                found.append(DocCommand(name, prose.count("\n", 0, match.start()) + 1, span, inline=True))
    return found


def _variants(text: str) -> list[list[str]]:
    """The command's words with placeholders filled in; one word list per `a|b` alternative."""
    words = shlex.split(text.replace("\\|", " \\| "), comments=True)
    if ">" in words:  # a shell redirection: not ctfed's
        words = words[: words.index(">")]
    words = _strip_wrappers(words)
    cleaned: list[str] = []
    for word in words:
        # `[--encoder CKPT]`, `[preset=NAME]`: optional words are checked as if given. A value's own
        # brackets (`finetune.label_names=[any]`) never open a word, so they stay.
        word = word.lstrip("[")
        while word.endswith("]") and word.count("]") > word.count("["):
            word = word[:-1]
        if word in ("", "...", "overrides", "RECIPE"):
            continue
        word = ANGLE.sub("hospital-a", word)
        key, equals, value = word.partition("=")
        if equals and not key.startswith("-") and value in PLACEHOLDERS:
            word = f"{key}={PLACEHOLDERS[value]}"
        cleaned.append(PLACEHOLDERS.get(word, word))
    variants = [cleaned]
    # `[--quick | --smoke]`: a standalone bar separates alternatives of the words either side.
    while any("|" in words for words in variants):
        expanded = []
        for words in variants:
            if "|" not in words:
                expanded.append(words)
                continue
            bar = words.index("|")
            expanded.append(words[:bar] + words[bar + 2:])
            expanded.append(words[: bar - 1] + words[bar + 1:])
        variants = expanded
    # `monai-bundle|torchscript` inside one word.
    result = []
    for words in variants:
        index = next((i for i, word in enumerate(words) if "|" in word and "=" not in word), None)
        if index is None:
            result.append(words)
        else:
            result.extend(words[:index] + [choice] + words[index + 1:] for choice in words[index].split("|"))
    if COMMAND_WORD in cleaned:
        from ctfed.common.cli import SUBCOMMANDS

        result = [[sub.name if w == COMMAND_WORD else w for w in words] for words in result for sub in SUBCOMMANDS]
    return result


class ParseError(Exception):
    """argparse's error message, raised instead of exiting."""


def _raising(parser: argparse.ArgumentParser) -> None:
    def error(message: str) -> None:
        raise ParseError(message)

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _raising(sub)


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace | None:
    """Parse with argparse, options and positionals intermixed as a ``main`` may take them
    (plainly where the parser has subcommands or a remainder, which argparse cannot intermix);
    None where it printed --help and exited 0."""
    _raising(parser)
    plain = any(isinstance(action, argparse._SubParsersAction) or action.nargs in (argparse.REMAINDER, argparse.PARSER)
                for action in parser._actions)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args) if plain else parser.parse_intermixed_args(args)
    except SystemExit as exit_:
        if exit_.code == 0:
            return None
        raise ParseError(f"exit {exit_.code}") from None


def _fragment_error(message: str) -> bool:
    """An incomplete line, as prose names a flag: a missing value or a missing required option."""
    return message.startswith("the following arguments are required") or message.startswith("expected one argument") \
        or bool(re.match(r"argument \S+: expected (one|at least one) argument", message))


def _simulate_overrides(overrides: list[str]) -> None:
    from ctfed.simulations.config import load_simulation_config

    load_simulation_config(overrides)


def _run_overrides(overrides: list[str]) -> None:
    from ctfed.common.config import load_run_config

    load_run_config(overrides)


def _label_signal_overrides(overrides: list[str]) -> None:
    # label_signal composes its pretraining as the compare preset plus --train (encoder_probe).
    from ctfed.simulations.config import load_simulation_config

    load_simulation_config(["preset=compare", *overrides])


def _site_overrides(overrides: list[str]) -> None:
    # `ctfed site --config site.yaml KEY=VALUE`: over the template every site.yaml starts from.
    from ctfed.common.config import read_site_config

    read_site_config(REPO / "conf" / "site.yaml", overrides)


# Which loader composes a command's Hydra overrides: (program, subcommand or module) -> (loader, attribute).
OVERRIDE_LOADERS: dict[tuple[str, str], tuple[Callable[[list[str]], None], str]] = {
    ("ctfed", "simulate"): (_simulate_overrides, "overrides"),
    ("ctfed", "pretrain"): (_run_overrides, "overrides"),
    ("ctfed", "finetune"): (_run_overrides, "overrides"),
    ("ctfed", "site"): (_site_overrides, "overrides"),
    ("python", "ctfed.simulations.data.label_signal"): (_label_signal_overrides, "train"),
    # Merged over the study run's saved simulation config: they must compose as ctfed simulate's do.
    ("python", "ctfed.simulations.studies.label_efficiency"): (_simulate_overrides, "overrides"),
}


def check_command(command: DocCommand) -> list[str]:
    """What is wrong with one doc command (empty: valid)."""
    from ctfed.common.cli import SUBCOMMANDS, _build_parser
    from ctfed.common.config import ConfigError

    problems = []
    for words in _variants(command.text):
        if words[0] == "ctfed":
            program, args = "ctfed", words[1:]
            first = next((w for w in args if not w.startswith("-")), None)
            if first is not None and first not in {sub.name for sub in SUBCOMMANDS}:
                problems.append(f"{command}: no subcommand 'ctfed {first}'")
                continue
            parser, chosen = _build_parser(args)
            key = ("ctfed", chosen.name if chosen else "")
        else:
            program, module_name, args = "python", words[2], words[3:]
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                problems.append(f"{command}: module {module_name} does not import: {err}")
                continue
            build = getattr(module, "build_parser", None)
            if build is None:
                problems.append(f"{command}: {module_name} exposes no build_parser() to parse its command line with")
                continue
            parser, key = build(), ("python", module_name)
        # Exact option names: argparse would also take an abbreviation, which the docs should not teach.
        known = {option for action in _all_actions(parser, args) for option in action.option_strings}
        own_args = args[: args.index("--")] if "--" in args else args  # after `--`: another program's
        unknown = [w.split("=", 1)[0] for w in own_args if w.startswith("-") and w.split("=", 1)[0] not in known]
        if unknown:
            problems.append(f"{command}: unknown option(s) {unknown}")
            continue
        try:
            namespace = _parse(parser, args)
        except ParseError as err:
            message = str(err)
            if command.inline and _fragment_error(message):
                namespace = None  # a fragment in prose: its flags exist (checked above)
            else:
                problems.append(f"{command}: does not parse: {message}")
                continue
        overrides = _override_words(namespace, key, args)
        if overrides:
            if key not in OVERRIDE_LOADERS:
                problems.append(f"{command}: overrides {overrides} but no loader known for {key}")
                continue
            loader, _ = OVERRIDE_LOADERS[key]
            try:
                loader(overrides)
            except ConfigError as err:
                problems.append(f"{command}: overrides {overrides} do not compose: {str(err).splitlines()[0]}")
    return problems


def _all_actions(parser: argparse.ArgumentParser, args: list[str]) -> list[argparse.Action]:
    """The parser's actions and those of the subcommand the args name."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in args:
                if word in action.choices:
                    actions.extend(action.choices[word]._actions)
                    break
    return actions


def _override_words(namespace: argparse.Namespace | None, key: tuple[str, str], args: list[str]) -> list[str]:
    if namespace is not None:
        attribute = OVERRIDE_LOADERS.get(key, (None, "overrides"))[1]
        return list(getattr(namespace, attribute, None) or [])
    # A fragment: its key=value words (not an option's --x=y).
    return [w for w in args if re.match(r"^[A-Za-z_][\w.]*=", w)]


COMMANDS = doc_commands()


def test_the_docs_commands_are_found() -> None:
    """The extraction sees what a reader sees: fenced and inline, ctfed and python -m, every page."""
    texts = [command.text for command in COMMANDS]
    assert len(COMMANDS) >= 80, len(COMMANDS)
    assert any(c.inline for c in COMMANDS) and any(not c.inline for c in COMMANDS)
    assert any("python -m ctfed.simulations.data.label_signal" in t for t in texts)
    assert any("python -m ctfed.simulations.bench.views_bench" in t for t in texts)
    assert any("ctfed prepare --input data/dicom/site_$s" in t and not t.startswith("for") for t in texts), "for-loop body"
    pages = {command.page for command in COMMANDS}
    assert {"README.md", "docs/deploy.md", "docs/simulate.md", "docs/studies.md", "docs/benchmarks.md",
            "docs/predict-and-export.md", "docs/security.md"} <= pages


def test_every_doc_command_is_valid() -> None:
    problems = []
    for command in COMMANDS:
        if command.text in UNCHECKED:
            continue
        problems.extend(check_command(command))
    assert not problems, "\n".join(problems)


def test_unchecked_list_is_current() -> None:
    texts = {command.text for command in COMMANDS}
    stale = [text for text in UNCHECKED if text not in texts]
    assert not stale, f"UNCHECKED lists commands no longer in the docs: {stale}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ctfed simulte federation.rounds=2", "no subcommand"),
        ("ctfed site --config site.yaml --chek", "unknown option"),
        ("ctfed predict --classifier CKPT --input DIR --output p.csv --batch-size many", "does not parse"),
        ("ctfed simulate federation.roundz=3", "do not compose"),
        ("ctfed simulate preset=nosuchpreset", "do not compose"),
        ("ctfed simulate model=vit_q", "do not compose"),
        ("ctfed pretrain --cache C --out O train.local_steps=many", "do not compose"),
        ("python -m ctfed.simulations.data.label_signal --out DIR --train train.nosuch=1", "do not compose"),
        ("python -m ctfed.simulations.data.label_signal --out DIR --finding-scael 3", "unknown option"),
        ("python -m ctfed.simulations.bench.nosuch_bench --quick", "does not import"),
        ("ctfed site --config site.yaml runtime_prt=9095", "do not compose"),
    ],
)
def test_a_wrong_command_is_caught(text: str, expected: str) -> None:
    problems = check_command(DocCommand("test", 1, text, inline=False))
    assert problems and expected in problems[0], problems


def test_an_inline_fragment_is_accepted_but_an_unknown_flag_is_not() -> None:
    assert check_command(DocCommand("test", 1, "ctfed server --port", inline=True)) == []
    assert check_command(DocCommand("test", 1, "ctfed server --prot", inline=True))
    assert check_command(DocCommand("test", 1, "ctfed server --port", inline=False))


def _flower_config_args() -> list[tuple[str, str, str]]:
    """(where, option, value) of every `--run-config` / `--node-config` value in the doc pages."""
    found = []
    for page in DOC_PAGES:
        text = page.read_text()
        name = str(page.relative_to(REPO))
        pieces = [m.group("body").replace("\\\n", " ") for m in FENCE.finditer(text) if m.group("info").startswith("bash")]
        prose = FENCE.sub("", text)
        pieces += [" ".join(m.group(1).split()) for m in INLINE.finditer(prose)]
        for piece in pieces:
            for line in piece.splitlines():
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                for index, word in enumerate(words[:-1]):
                    if word in ("--run-config", "--node-config"):
                        found.append((f"{name}: {line.strip()}", word, words[index + 1]))
    return found


def _node_config_keys() -> set[str]:
    """The node-config keys a deployed site's ClientApp reads."""
    from ctfed.client.app import DEVICE_NODE_KEY
    from ctfed.client.policy import POLICY_FILE_KEY
    from ctfed.client.secagg import ROSTER_KEY, SIGNING_KEY_KEY
    from ctfed.client.site import DATA_PATH_KEY, PARTITION_ID_KEY, SITE_ID_KEY, STATE_DIR_KEY

    return {DEVICE_NODE_KEY, POLICY_FILE_KEY, ROSTER_KEY, SIGNING_KEY_KEY, DATA_PATH_KEY, PARTITION_ID_KEY,
            SITE_ID_KEY, STATE_DIR_KEY}


def test_flower_run_and_node_config_keys_in_the_docs_exist() -> None:
    """`flwr run --run-config` keys are the app's own ([tool.flwr.app.config] in pyproject.toml, with
    the type of its default), `--node-config` keys are ones the ClientApp reads; Flower would
    otherwise pass an unknown key through unread."""
    import tomllib

    from flwr.common.config import parse_config_args

    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    node_keys = _node_config_keys()
    found = _flower_config_args()
    assert {option for _, option, _ in found} == {"--run-config", "--node-config"}, found
    problems = []
    for where, option, value in found:
        for key, parsed in parse_config_args([value]).items():
            if option == "--node-config":
                if key not in node_keys:
                    problems.append(f"{where}: node config key '{key}' is not read by the ClientApp ({sorted(node_keys)})")
            elif key not in app_config:
                problems.append(f"{where}: run config key '{key}' is not in [tool.flwr.app.config] ({sorted(app_config)})")
            elif type(parsed) is not type(app_config[key]) and not (isinstance(app_config[key], float) and type(parsed) is int):
                problems.append(f"{where}: '{key}={parsed!r}' is a {type(parsed).__name__}; the app's default is a "
                                f"{type(app_config[key]).__name__}")
    assert not problems, "\n".join(problems)


def test_valid_overrides_of_each_loader_pass() -> None:
    """The negative cases above fail for the planted mistake, not because a loader rejects everything."""
    for text in ("ctfed site --config site.yaml runtime_port=9095", "ctfed simulate preset=privacy federation.rounds=3",
                 "ctfed pretrain --cache C --out O model=small train.local_steps=2",
                 "python -m ctfed.simulations.data.label_signal --out DIR --train train.mim_objective=mae"):
        assert check_command(DocCommand("test", 1, text, inline=False)) == [], text


def test_the_readme_stays_a_short_user_guide() -> None:
    """Issue #16: the README is at most ~12 KB, with the two-command set-up, one quickstart per
    user, the commands table and pointers to docs/; findings and tables live in docs/."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 12 * 1024, f"README.md is {len(readme.encode('utf-8'))} bytes: move detail to docs/"
    headings = re.findall(r"^#{2,3} (.+)$", readme, flags=re.MULTILINE)
    assert headings[0] == "Set-up: two commands" and {"Quickstarts", "Commands", "Documentation"} <= set(headings)
    for user in ("Researchers", "Coordinators", "Hospital IT", "Clinical use"):
        assert any(h.startswith(user) for h in headings), user
    for page in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / page).exists(), page
