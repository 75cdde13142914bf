"""docker-compose.yml is a valid Compose file with the services the brief asks for.

No Docker engine is needed (none runs on the development and CI machines).
Where ``docker-compose`` (Debian's 1.29, which validates without an engine) or a
``docker compose`` plugin works, the file is validated by it and its normalized
output is checked too. Every run also parses the file with the small block-YAML
reader below (PyYAML is not a dependency), so the test never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

SERVICES = {"kafka", "rabbitmq", "redis", "demo"}
BROKERS = ("kafka", "rabbitmq", "redis")
DEMO_ARGS = ["demo", "--kafka", "kafka:9092", "--amqp", "amqp://guest:guest@rabbitmq:5672/"]


# --------------------------------------------------------------------------- #
# A reader for the block-style YAML subset that Compose files and
# `docker-compose config` output use: block mappings and sequences, plain,
# quoted and folded plain scalars, JSON-style flow sequences, full-line comments.
# Anything else (tabs, anchors, block scalars, bad indentation, duplicate keys)
# is an error, so a malformed file fails the test.
# --------------------------------------------------------------------------- #

_KEY = re.compile(
    r"""^(?P<key>"[^"]*"|'[^']*'|[^\s"'#\-:{}\[\],&*!|>][^:]*?)"""  # a key, maybe quoted
    r":(?:\s+(?P<value>.*))?$"  # the colon, then maybe a value
)


class YamlSubsetError(ValueError):
    pass


@dataclass
class _Line:
    number: int
    indent: int
    text: str


def _significant_lines(source: str) -> list[_Line]:
    lines: list[_Line] = []
    for number, raw in enumerate(source.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"line {number}: tab in indentation")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#") or stripped == "---":
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        text = raw.strip()
        # "- key: value" opens a mapping inside a sequence item.
        if text.startswith("- ") and _KEY.match(text[2:].strip()):
            lines.append(_Line(number, indent, "-"))
            lines.append(_Line(number, indent + 2, text[2:].strip()))
        else:
            lines.append(_Line(number, indent, text))
    return lines


def _scalar(text: str, number: int) -> Any:
    if text[:1] in ("&", "*", "!", "|", ">", "{"):
        raise YamlSubsetError(f"line {number}: unsupported YAML construct {text[:10]!r}")
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise YamlSubsetError(f"line {number}: unterminated quoted scalar")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise YamlSubsetError(f"line {number}: unsupported flow sequence") from exc
    return text


class _Reader:
    def __init__(self, source: str) -> None:
        self.lines = _significant_lines(source)
        self.pos = 0

    def document(self) -> dict[str, Any]:
        if not self.lines:
            raise YamlSubsetError("empty document")
        first = self.lines[0]
        if first.indent != 0:
            raise YamlSubsetError(f"line {first.number}: document must start at column 0")
        node = self._block(0)
        if self.pos != len(self.lines):
            bad = self.lines[self.pos]
            raise YamlSubsetError(f"line {bad.number}: unexpected indentation")
        if not isinstance(node, dict):
            raise YamlSubsetError("top level is not a mapping")
        return node

    def _peek(self) -> _Line | None:
        return self.lines[self.pos] if self.pos < len(self.lines) else None

    def _block(self, indent: int) -> Any:
        line = self._peek()
        assert line is not None and line.indent == indent
        if line.text == "-" or line.text.startswith("- "):
            return self._sequence(indent)
        return self._mapping(indent)

    def _continuation(self, text: str, indent: int) -> str:
        """Join folded plain-scalar lines (deeper-indented, not keys or items)."""
        while (nxt := self._peek()) is not None and nxt.indent > indent:
            if nxt.text.startswith("-") or _KEY.match(nxt.text):
                break
            text = f"{text} {nxt.text}"
            self.pos += 1
        return text

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (line := self._peek()) is not None and line.indent == indent:
            if line.text == "-":
                self.pos += 1
                nxt = self._peek()
                if nxt is None or nxt.indent <= indent:
                    items.append(None)
                else:
                    items.append(self._block(nxt.indent))
            elif line.text.startswith("- "):
                self.pos += 1
                text = self._continuation(line.text[2:].strip(), indent)
                items.append(_scalar(text, line.number))
            else:
                break
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while (line := self._peek()) is not None and line.indent == indent:
            if line.text.startswith("-"):
                raise YamlSubsetError(f"line {line.number}: sequence item inside a mapping")
            match = _KEY.match(line.text)
            if match is None:
                raise YamlSubsetError(f"line {line.number}: expected 'key:' got {line.text!r}")
            key = _scalar(match["key"], line.number)
            if key in mapping:
                raise YamlSubsetError(f"line {line.number}: duplicate key {key!r}")
            self.pos += 1
            value = match["value"]
            if value:
                mapping[key] = _scalar(self._continuation(value, indent), line.number)
                continue
            nxt = self._peek()
            if nxt is not None and nxt.indent > indent:
                mapping[key] = self._block(nxt.indent)
            elif nxt is not None and nxt.indent == indent and nxt.text.startswith("-"):
                mapping[key] = self._sequence(indent)  # PyYAML's indentless sequences
            else:
                mapping[key] = None
        return mapping


def parse_yaml_subset(source: str) -> dict[str, Any]:
    return _Reader(source).document()


# --------------------------------------------------------------------------- #
# the checks, shared by the raw file and the normalized `config` output
# --------------------------------------------------------------------------- #


def _as_list(command: Any) -> list[str]:
    if isinstance(command, list):
        return [str(part) for part in command]
    return str(command).split()


def check_compose(doc: dict[str, Any]) -> None:
    services = doc.get("services")
    assert isinstance(services, dict), "no services mapping"
    assert set(services) >= SERVICES, f"services present: {sorted(services)}"

    for name in BROKERS:
        health = services[name].get("healthcheck")
        assert isinstance(health, dict) and health.get("test"), f"{name} has no healthcheck"

    kafka = services["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    env = kafka["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    assert "controller" in env["KAFKA_PROCESS_ROLES"].split(","), "Kafka is not in KRaft mode"
    assert "broker" in env["KAFKA_PROCESS_ROLES"].split(",")
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env

    assert str(services["rabbitmq"]["image"]).startswith("rabbitmq:")
    assert str(services["redis"]["image"]).startswith("redis:")

    demo = services["demo"]
    build = demo["build"]
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    assert dockerfile == "Dockerfile"
    assert _as_list(demo["command"])[-len(DEMO_ARGS) :] == DEMO_ARGS
    depends = demo["depends_on"]
    assert isinstance(depends, dict), "demo.depends_on must use the long form with conditions"
    for name in ("kafka", "rabbitmq"):
        assert depends[name]["condition"] == "service_healthy", f"demo does not wait for {name}"
    for name, rule in depends.items():
        assert rule["condition"] == "service_healthy", name


def _compose_command() -> list[str] | None:
    """The first Compose CLI that runs here, or None."""
    candidates: list[list[str]] = []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for base in candidates:
        try:
            probe = subprocess.run(
                [*base, "version"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return base
    return None


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #


def test_compose_file_structure() -> None:
    check_compose(parse_yaml_subset(COMPOSE_FILE.read_text()))


def test_compose_file_validates() -> None:
    """Validated by a Compose CLI where one runs; by the subset reader otherwise."""
    command = _compose_command()
    if command is None:
        # No Compose CLI here: the structural parse is the validation that remains.
        check_compose(parse_yaml_subset(COMPOSE_FILE.read_text()))
        return
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(command)} config rejected the file:\n{result.stderr}"
    check_compose(parse_yaml_subset(result.stdout))


def test_dockerfile_builds_the_demo() -> None:
    text = DOCKERFILE.read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert instructions[0] == "FROM python:3.11-slim"
    assert any(re.match(r"COPY \. ", line) for line in instructions)
    assert re.search(r"\bpip install \.(\s|$)", text)
    cmd = [line for line in instructions if line.startswith("CMD ")]
    assert cmd, "no CMD"
    assert json.loads(cmd[-1][4:]) == ["trusthop", *DEMO_ARGS]


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("services:\n  a:\n    image: x\n   b: 1\n", "unexpected indentation"),
        ("services:\n  a:\n    image: x\n    image: y\n", "duplicate key"),
        ("services:\n\ta: 1\n", "tab"),
        ("services:\n  a: &anchor x\n", "unsupported"),
        ("services:\n  - a\n  b: 1\n", "line 3: unexpected indentation"),
        ("services:\n  a:\n    just text\n", "expected 'key:'"),
    ],
)
def test_subset_reader_rejects_malformed_yaml(source: str, problem: str) -> None:
    with pytest.raises(YamlSubsetError, match=problem):
        parse_yaml_subset(source)


def test_subset_reader_reads_compose_shapes() -> None:
    doc = parse_yaml_subset(
        "# comment\n"
        "services:\n"
        "  web:\n"
        '    command: ["a", "b c"]\n'
        "    ports:\n"
        "    - 127.0.0.1:80:80/tcp\n"
        "    healthcheck:\n"
        "      test:\n"
        "      - CMD-SHELL\n"
        "      - long command that\n"
        "        was folded\n"
        "    environment:\n"
        "      A: '1'\n"
        '      B: "two"\n'
        "    volumes:\n"
        "      - type: bind\n"
        "        source: .\n"
        "version: '3.9'\n"
    )
    web = doc["services"]["web"]
    assert web["command"] == ["a", "b c"]
    assert web["ports"] == ["127.0.0.1:80:80/tcp"]
    assert web["healthcheck"]["test"] == ["CMD-SHELL", "long command that was folded"]
    assert web["environment"] == {"A": "1", "B": "two"}
    assert web["volumes"] == [{"type": "bind", "source": "."}]
    assert doc["version"] == "3.9"
