"""README.md and the Makefile checked against the code, so that they cannot drift (no broker).

- README's topic table: the record types of each topic are the ones the code writes there. No
  single place maps topics to record types, so the map is read from the code itself: every call
  of hark/ and services/ that writes a record (``Output(topic, "Type", ...)``,
  ``produce(topic, key, "Type", ...)``, ``serde.encode("Type", ...)``, a publisher's
  ``self._produce("Type", ...)``) names its record type as a literal, and its topic either in the
  same call or in the one method or class that sends what it encodes, or, for a service that is
  handed its topic, the one topic of its own its declaration names (``services/NAME/spec.py``;
  ``_topics_written``). Every type of ``serde.RECORD_TYPES`` must be found written somewhere, so
  a writer this reading misses fails the test instead of passing silently. The plain tier: a
  tenant's published topic carries the records of ``schemas/published/``; its produce topic the
  record types ingest's Kafka source accepts. An opt-in service's own topic (``hark up --with``)
  may be left out of README; listed, it is checked like the others.
- README's command table: exactly the `hark` subcommands of hark_cli's parser (built by
  ``hark_cli.main.main`` itself, stopped before it parses anything), with each one's actions.
- Every bench module a reader can run is run by a make target.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from hark import serde
from hark.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CODE_DIRS = ("hark", "services", "hark_cli")
# calls that write a record, or encode one to be written: the record type is one of their arguments
WRITERS = {"Output", "produce", "_produce", "encode"}
TENANT = "<tenant>"  # how README writes a tenant's name in a topic


def _section(heading: str) -> str:
    """README's text from ``heading`` to the next heading of the same or a higher level."""
    level = len(heading.split()[0])
    start = README.index(heading + "\n") + len(heading)
    end = re.search(rf"^#{{1,{level}}} ", README[start:], re.M)
    return README[start : start + end.start()] if end else README[start:]


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown table in ``text``, as cells (``\\|`` inside a cell kept)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows[1:]  # the header


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


# -- the code's truth: which record types each topic carries ---------------------------------------
def _topic_attrs(node: ast.AST) -> set[str]:
    """Settings' topic properties named under ``node`` (``settings.audio_topic`` -> audio_topic)."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr.endswith("_topic")}


@functools.cache
def _trees() -> tuple[tuple[Path, ast.Module], ...]:
    """The parsed modules of the library, the services and the CLI."""
    paths = sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))
    return tuple((p, ast.parse(p.read_text(), str(p))) for p in paths)


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _own_topics(path: Path) -> tuple[set[str], bool]:
    """The topics of its own (references that are no Settings attribute) the declaration of the
    service ``path`` belongs to writes, and whether the stack runs that service by default."""
    rel = path.relative_to(ROOT).parts
    if rel[0] != "services" or len(rel) < 3 or not (ROOT / "services" / rel[1] / "spec.py").exists():
        return set(), True
    spec = importlib.import_module(f"services.{rel[1]}.spec").SPEC
    return {ref for ref in spec.writes if not hasattr(Settings, ref)}, spec.default


Scope = ast.FunctionDef | ast.AsyncFunctionDef


def _calls(
    node: ast.AST, fn: Scope | None, cls: ast.ClassDef | None
) -> Iterator[tuple[ast.Call, Scope | None, ast.ClassDef | None]]:
    """Every call under ``node``, with the innermost function and class around it."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield from _calls(child, None, child)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _calls(child, child, cls)
        else:
            if isinstance(child, ast.Call):
                yield child, fn, cls
            yield from _calls(child, fn, cls)


@functools.cache
def _topics_written() -> dict[str, set[str]]:
    """{topic reference (a Settings topic property, or a service's own topic's word): record
    types written to it}, read from the code (module doc)."""
    found: dict[str, set[str]] = defaultdict(set)
    unresolved = []
    for path, tree in _trees():
        for call, fn, cls in _calls(tree, None, None):
            if _callee(call) not in WRITERS:
                continue
            args = [*call.args, *(k.value for k in call.keywords)]
            rtypes = {a.value for a in args if isinstance(a, ast.Constant) and a.value in serde.RECORD_TYPES}
            if not rtypes:
                continue
            topics = set().union(*(_topic_attrs(a) for a in args))
            if not topics and cls is not None and isinstance(call.func, ast.Attribute):
                # self._produce("Type", ...): the method that sends names the topic
                method = next(
                    (
                        m
                        for m in cls.body
                        if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and m.name == call.func.attr
                    ),
                    None,
                )
                topics = _topic_attrs(method) if method is not None else set()
            if not topics and fn is not None:  # serde.encode("Type", ...) sent further down
                topics = _topic_attrs(fn)
            if not topics and cls is not None:  # ... or to a topic the class keeps (self.topic)
                topics = _topic_attrs(cls)
            if not topics:  # a processor handed its topic: the service's own, by its declaration
                topics = _own_topics(path)[0]
            if len(topics) != 1:
                unresolved.append(f"{path.relative_to(ROOT)}:{call.lineno} {sorted(rtypes)} -> {sorted(topics)}")
                continue
            found[topics.pop()] |= rtypes
    assert not unresolved, "a record written to no single topic this test can tell:\n" + "\n".join(unresolved)
    return dict(found)


def _literals_in(path: Path) -> set[str]:
    """The record types a module names as string literals (compared with, refused, written)."""
    tree = ast.parse((ROOT / path).read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in serde.RECORD_TYPES}


def _published_records() -> set[str]:
    names = set()
    for f in sorted((serde.SCHEMA_DIR / "published").glob("*.avsc")):
        d = json.loads(f.read_text())
        names.add(f"{d['namespace']}.{d['name']}")
    return names


def _opt_in_topics() -> set[str]:
    """The names of the topics of their own that opt-in services write."""
    s = Settings()
    refs = set()
    for spec in sorted((ROOT / "services").glob("*/spec.py")):
        own, default = _own_topics(spec.parent / "service.py")
        refs |= set() if default else own
    return {s.topic(ref) for ref in refs}


def _code_topics() -> dict[str, set[str]]:
    """{topic name as README writes it: the record types the code puts on it}."""
    s = Settings()
    internal = {(getattr(s, ref) if hasattr(s, ref) else s.topic(ref)): t for ref, t in _topics_written().items()}
    assert set(s.all_topics) <= set(internal), f"hark's topics no record was found written to: {s.all_topics}"
    return {
        **internal,
        s.published_topic(TENANT): _published_records(),
        # what a tenant's own producers may publish: what ingest reads from their topic
        s.produce_topic(TENANT): _literals_in(Path("services/ingest/kafka_source.py")),
    }


def _readme_topics() -> dict[str, tuple[set[str], str]]:
    """{topic: (record types README lists for it, the row's text)}."""
    out = {}
    for cells in _table_rows(_section("## Topics")):
        topic, records = _spans(cells[0])[0], cells[2]
        out[topic] = ({r for r in _spans(records) if re.fullmatch(r"(hark\.published\.)?[A-Z]\w*", r)}, records)
    return out


def test_every_record_type_is_found_written_somewhere():
    """The reading of the code below misses no writer: each record type has one."""
    written = set().union(*_topics_written().values())
    assert written == set(serde.RECORD_TYPES)


def test_readme_topic_table_lists_the_record_types_the_code_writes_on_each_topic():
    readme, code = _readme_topics(), _code_topics()
    assert set(code) - _opt_in_topics() <= set(readme) <= set(code), (
        f"missing from README: {sorted(set(code) - _opt_in_topics() - set(readme))}; "
        f"no such topic: {sorted(set(readme) - set(code))}"
    )
    diff = {t: (sorted(readme[t][0]), sorted(code[t])) for t in readme if readme[t][0] != code[t]}
    assert not diff, "topic: (README lists, the code writes): " + repr(diff)


def _kind_symbols(record: str) -> set[str]:
    """Every enum symbol of a record's schema (its kinds and statuses), and the kinds a string
    ``kind`` field's doc names (the published contract's)."""
    name = record.split(".")[-1]
    folder = serde.SCHEMA_DIR / ("published" if record.startswith("hark.published.") else "")
    d = json.loads((folder / f"{record if '.' in record else 'hark.' + name}.avsc").read_text())
    out: set[str] = set()

    def walk(t) -> None:
        if isinstance(t, dict):
            if t.get("type") == "enum":
                out.update(t["symbols"])
            if t.get("name") == "kind" and t.get("type") == "string":
                out.update(re.findall(r"\b[A-Z][A-Z_]{2,}\b", t.get("doc", "")))
            for v in t.values():
                walk(v)
        elif isinstance(t, list):
            for v in t:
                walk(v)

    walk(d)
    return out


def test_readme_names_only_kinds_the_schemas_have():
    for topic, (records, text) in _readme_topics().items():
        kinds = set(re.findall(r"\b[A-Z][A-Z_]{2,}\b", text))
        known = set().union(*(_kind_symbols(r) for r in records))
        assert kinds <= known, f"{topic}: {sorted(kinds - known)} is no kind of {sorted(records)}"


def test_readme_result_row_names_every_result_kind_and_every_source_of_a_final():
    text = _readme_topics()[Settings().results_topic][1]
    assert _kind_symbols("Result") <= set(re.findall(r"\b[A-Z][A-Z_]{2,}\b", text))
    sources = set()  # result_record(rec, "FINAL", "<source>", ...) wherever a FINAL is made
    for _path, tree in _trees():
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and _callee(call) == "result_record" and len(call.args) >= 3:
                kind, source = call.args[1], call.args[2]
                if isinstance(kind, ast.Constant) and kind.value == "FINAL" and isinstance(source, ast.Constant):
                    sources.add(source.value)
    assert sources >= {"online", "offline"}, sources
    missing = {s for s in sources if not re.search(rf"\b{s}\b", text)}
    assert not missing, f"README's Result row omits the FINAL source(s) {sorted(missing)}"


# -- the command table ------------------------------------------------------------------------------
class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _parser(monkeypatch) -> argparse.ArgumentParser:
    """hark's parser as ``hark_cli.main.main`` builds it, taken before it parses anything."""
    from hark_cli import main

    def stop(self, *args, **kwargs):
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Built) as built:
        main.main([])
    return built.value.parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """{subcommand: its actions (nested subcommands, or the choices of a positional ``action``)}."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        actions: set[str] = set()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                actions = set(a.choices)
                break
            if a.dest == "action" and a.choices:
                actions = set(a.choices)
                break
        out[name] = actions
    return out


def _readme_invocations(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, the actions after it) of every inline `hark ...` code span in ``text``."""
    out = []
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # the diagram is no command line
    for span in _spans(prose):
        words = span.replace("\\|", "|").split()
        if words[:1] != ["hark"]:
            continue
        words = [w for w in words[1:] if not w.startswith("-")]
        if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
            continue  # `hark -v COMMAND`: a placeholder
        actions = words[1].split("|") if len(words) > 1 else []
        out.append((words[0], [a for a in actions if re.fullmatch(r"[a-z][a-z-]*", a)]))
    return out


def test_readme_command_table_lists_exactly_the_hark_subcommands(monkeypatch):
    commands = _commands(_parser(monkeypatch))
    table = "\n".join(cells[0] for cells in _table_rows(_section("## The `hark` command")))
    listed: dict[str, set[str]] = defaultdict(set)
    for name, actions in _readme_invocations(table):
        listed[name].update(actions)
    assert set(listed) == set(commands), (
        f"missing from README: {sorted(set(commands) - set(listed))}; "
        f"no such subcommand: {sorted(set(listed) - set(commands))}"
    )
    for name, actions in commands.items():
        assert listed[name] == actions, (
            f"`hark {name}`: README lists {sorted(listed[name])}, hark has {sorted(actions)}"
        )


def test_readme_names_no_subcommand_hark_does_not_have(monkeypatch):
    commands = _commands(_parser(monkeypatch))
    for name, actions in _readme_invocations(README):
        assert name in commands, f"README names `hark {name}`, which hark does not have"
        if commands[name]:
            assert set(actions) <= commands[name], f"`hark {name} {'|'.join(actions)}` in README"


def test_readme_stays_short():
    assert len(README.splitlines()) <= 200


# -- benches ----------------------------------------------------------------------------------------
def test_every_runnable_bench_module_is_run_by_a_make_target():
    """A bench module with a ``__main__`` block must be named in the Makefile (``bench.NAME``); one
    without is a helper, and then another bench module imports it."""
    makefile = (ROOT / "Makefile").read_text()
    recipes = "\n".join(line for line in makefile.splitlines() if line.startswith("\t"))
    modules = {p.stem: p.read_text() for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"}
    for name, text in sorted(modules.items()):
        if 'if __name__ == "__main__":' in text:
            assert re.search(rf"-m bench\.{name}\b", recipes), f"bench/{name}.py is run by no make target"
        else:
            importers = [
                other
                for other, t in modules.items()
                if other != name and re.search(rf"^(from bench\.{name} import|from bench import .*\b{name}\b)", t, re.M)
            ]
            assert importers, f"bench/{name}.py is neither run by a make target nor imported by a bench module"
