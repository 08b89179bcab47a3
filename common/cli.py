"""The `djs` command: runs the proxy, a node, or a whole local cluster, and talks to a node
over the same line protocol that netcat users type."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from cluster_node.cli import node, parse_address
from common.netcat import LineClient
from reverse_proxy.cli import proxy

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="djs: a fault-tolerant distributed job scheduler.")
app.command("proxy")(proxy)
app.command("node")(node)

NodeOption = Annotated[str, typer.Option(
    "--node", envvar="DJS_NODE", help="The node to talk to, HOST:PORT.")]


@app.command()
def cluster(
    nodes: Annotated[int, typer.Option(min=1, max=64, help="How many nodes.")] = 3,
    proxy_port: Annotated[int, typer.Option(help="The proxy's port (0: any free one).")
                          ] = 8080,
    first_port: Annotated[int, typer.Option(
        help="Client port of node-1; node-i gets first_port + i - 1 (0: any free ones).")
    ] = 9000,
    data: Annotated[Path, typer.Option(help="Parent of every process's data directory.")
                    ] = Path("data"),
    slots: Annotated[int, typer.Option(min=1, help="Slots of each node.")] = 4,
    host: Annotated[str, typer.Option(help="Address every process binds.")] = "127.0.0.1",
    allow_shell: Annotated[bool, typer.Option(help="Let the nodes run `sh` jobs.")] = False,
    dashboard_port: Annotated[int, typer.Option(
        min=0, max=65535, help="The proxy's web dashboard and /metrics (0: off).")] = 8081,
) -> None:
    """Start a proxy and N nodes on this machine (ports 8080, 9000...), until Ctrl-C."""
    from common.cluster import run_cluster

    env = {"ALLOW_SHELL": "1"} if allow_shell else {}
    if not (os.environ.get("CLUSTER_TOKEN") or os.environ.get("CLUSTER_TOKEN_FILE")):
        # Secure by default: a fresh token shared by this cluster's processes only.
        env["CLUSTER_TOKEN"] = secrets.token_hex(32)
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)  # as each process's own (0755 else)
        code = asyncio.run(run_cluster(nodes, proxy_port, first_port, data, slots, host, env,
                                       dashboard_port))
    except RuntimeError as exc:  # a process did not start: its own log lines say why
        typer.echo(f"cluster not started: {exc}", err=True)
        code = 1
    except OSError as exc:  # the data folder
        typer.echo(f"cluster not started: {exc}", err=True)
        code = 3
    raise typer.Exit(code)


@contextlib.contextmanager
def _client(node_address: str) -> Iterator[LineClient]:
    """A connection to the node; a node that cannot be reached (refused, reset, silent)
    is one line on stderr and exit status 1, not a traceback."""
    host, port = parse_address(node_address, 9000)
    try:
        with LineClient(host, port) as client:
            yield client
    except OSError as exc:
        typer.echo(f"cannot talk to the node at {host}:{port}: {exc}", err=True)
        raise typer.Exit(1) from exc


# A job's own words may look like options: `djs submit fib -1`, `djs submit sh ls -la`.
@app.command(context_settings={"ignore_unknown_options": True})
def submit(
    job: Annotated[list[str] | None, typer.Argument(
        help="A job as typed in netcat: '1500', 'fib 90', 'sh echo hi'.",
        show_default=False)] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="Submit every job of this file over one connection: a .json "
        "list of {\"job_type\", \"payload\"} objects, or one protocol line per line. "
        "Prints ticket<TAB>job per job.", show_default=False)] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds before it may run.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds an attempt may run.")
                       ] = None,
    retries: Annotated[int | None, typer.Option(help="Retries of a failed attempt.")] = None,
    node_address: NodeOption = "127.0.0.1:9000",
) -> None:
    """Submit one job (print its ticket) or a file of jobs (print ticket<TAB>job lines)."""
    if file is not None:
        if job:
            raise typer.BadParameter("give a job or --file, not both")
        _submit_file(file, node_address)
        return
    if not job:
        raise typer.BadParameter("give a job, e.g. 'djs submit fib 90', or --file FILE")
    words = job if not (len(job) == 1 and job[0].isdigit()) else ["sleep", job[0]]
    options = [f"--{name} {value}" for name, value in (
        ("priority", priority), ("delay", delay), ("timeout", timeout), ("retries", retries))
        if value is not None]
    with _client(node_address) as client:
        reply = client.ask(" ".join(["submit", *options, *words]))
    if not reply.startswith("Ticket ID: "):
        typer.echo(reply, err=True)
        raise typer.Exit(1)
    typer.echo(reply.removeprefix("Ticket ID: "))


def _submit_file(path: Path, node_address: str) -> None:
    import sys

    from common.bulk import BadJobsFile, load_jobs, submit_all

    try:
        lines = load_jobs(path)
    except (OSError, UnicodeDecodeError, BadJobsFile) as exc:
        typer.echo(f"{path}: {exc}", err=True)
        raise typer.Exit(1) from exc
    with _client(node_address) as client, typer.progressbar(
            length=len(lines), label="submitting", file=sys.stderr) as bar:
        client.settimeout(60)
        answers = submit_all(client, lines, bar.update)
    refused = 0
    for line, answer in zip(lines, answers, strict=True):
        job = line.removeprefix("submit ")
        if answer.startswith("Ticket ID: "):
            typer.echo(f"{answer.removeprefix('Ticket ID: ')}\t{job}")
        else:
            refused += 1
            typer.echo(f"{answer}\t{job}", err=True)
    typer.echo(f"{len(lines) - refused} submitted, {refused} refused", err=True)
    if refused:
        raise typer.Exit(1)


RESULT_EXITS = ("Exit status: 0 done (its result printed), 1 failed (FAILED: and the reason "
                "printed), 2 not finished yet, 3 cancelled (CANCELLED: and how printed), "
                "4 no such ticket or another error.")


@app.command(help=f"Print a ticket's result. {RESULT_EXITS}")
def result(ticket: str, node_address: NodeOption = "127.0.0.1:9000") -> None:
    with _client(node_address) as client:
        reply = client.ask(f"result {ticket}")
    _finish(reply)


@app.command(help=f"Block until a ticket's result is there, then print it. {RESULT_EXITS}")
def wait(
    ticket: str,
    seconds: Annotated[float | None, typer.Argument(
        help="Seconds to wait at most (as the protocol's `wait <ticket> [seconds]`).",
        show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 30.0,
    node_address: NodeOption = "127.0.0.1:9000",
) -> None:
    timeout = timeout if seconds is None else seconds
    with _client(node_address) as client:
        client.settimeout(timeout + 10)
        reply = client.ask(f"wait {ticket} {timeout:g}")
    _finish(reply)


def _finish(reply: str) -> None:
    """A result line as printed and told by the exit status (RESULT_EXITS): a cancelled
    job exited 0, and a failed one's text came without its FAILED: mark."""
    for mark, code in (("Result: FAILED: ", 1), ("Result: CANCELLED: ", 3)):
        if reply.startswith(mark):
            typer.echo(reply.removeprefix("Result: "))
            raise typer.Exit(code)
    if reply.startswith("Result: "):
        typer.echo(reply.removeprefix("Result: "))
        return
    typer.echo(reply, err=True)
    raise typer.Exit(2 if reply.startswith("Result has not") else 4)


@app.command()
def status(
    dashboard: Annotated[str, typer.Option(
        envvar="DJS_DASHBOARD", help="The proxy's dashboard, HOST:PORT (its DASHBOARD_PORT).")
    ] = "127.0.0.1:8081",
    token: Annotated[str | None, typer.Option(
        envvar="DASHBOARD_TOKEN", show_default=False,
        help="The dashboard's DASHBOARD_TOKEN, if it has one.")] = None,
    watch: Annotated[bool, typer.Option(help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")
                        ] = 1.0,
) -> None:
    """The cluster on one screen: nodes, queue, throughput and recent jobs."""
    import time

    from rich.console import Console
    from rich.live import Live

    from common.status import fetch, render

    host, port = parse_address(dashboard, 8081)
    base = f"http://{host}:{port}"
    console = Console()
    try:
        view = render(*fetch(base, token=token), width=console.width)
        if not watch:
            console.print(view)
            return
        with Live(view, console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(*fetch(base, token=token), width=console.width),
                            refresh=True)
    except OSError as exc:
        if getattr(exc, "code", None) == 401:  # (it said "cannot reach")
            typer.echo(f"the dashboard at {base} wants its token: set DASHBOARD_TOKEN (or "
                       "--token)", err=True)
        else:
            typer.echo(f"cannot reach the dashboard at {base}: {exc}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        return


@app.command()
def health(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a node's client port or of "
                                           "the proxy.")] = "127.0.0.1:9000",
    proxy_port: Annotated[bool, typer.Option(
        "--proxy", help="The address is a proxy: check that it accepts connections.")
    ] = False,
) -> None:
    """Exit 0 if the process answers: a node must reply to `stats`, a proxy must accept.
    Docker's HEALTHCHECK runs this. A node that wants CLIENT_TOKEN needs it in this
    command's environment too."""
    import socket

    host, port = parse_address(address, 8080 if proxy_port else 9000)
    try:
        if proxy_port:
            socket.create_connection((host, port), timeout=3).close()
            typer.echo("ok")
            return
        with LineClient(host, port, timeout=3) as client:
            reply = client.ask("stats")
    except OSError as exc:
        typer.echo(f"unhealthy: {exc}", err=True)
        raise typer.Exit(1) from exc
    if not reply.startswith("Stats: "):
        if not reply.isprintable():  # frames, not a line: it printed msgpack bytes
            reply = (f"{address} does not answer as a node's client port (a proxy's port? "
                     "then --proxy)")
        typer.echo(f"unhealthy: {reply}", err=True)
        raise typer.Exit(1)
    typer.echo(reply)


@app.command()
def cancel(ticket: str, node_address: NodeOption = "127.0.0.1:9000") -> None:
    """Cancel a job (from the node that issued its ticket); print what happened."""
    with _client(node_address) as client:
        reply = client.ask(f"cancel {ticket}")
    typer.echo(reply, err=reply.startswith("ERR "))
    if reply.startswith("ERR "):
        raise typer.Exit(1)


@app.command("list")
def list_tickets(
    state: Annotated[str, typer.Argument(
        help="all, pending, done, failed or cancelled.")] = "all",
    limit: Annotated[int, typer.Argument(min=1, max=10_000)] = 100,
    node_address: NodeOption = "127.0.0.1:9000",
) -> None:
    """A node's tickets with their state, newest first."""
    with _client(node_address) as client:
        first = client.ask(f"list {state} {limit}")
        if first.startswith("ERR "):
            typer.echo(first, err=True)
            raise typer.Exit(1)
        line = first
        while not line.startswith("END "):
            typer.echo(line)
            line = client.read_line()


@app.command()
def tail(ticket: str, node_address: NodeOption = "127.0.0.1:9000") -> None:
    """Print a running sh job's output lines as they come, then its result."""
    with _client(node_address) as client:
        client.settimeout(3700)
        client.send_lines([f"tail {ticket}"])
        while (line := client.read_line()).startswith("Output: "):
            typer.echo(line.removeprefix("Output: "))
    _finish(line)
@app.command()
def salvage(
    data_dir: Annotated[Path, typer.Option(
        "--data-dir", help="The data directory of a node or of the proxy, its process "
        "stopped.")],
) -> None:
    """Keep what can still be read of a store whose file is damaged ("database disk
    image is malformed"); the damaged files are kept beside it."""
    from common.errors import DataDirInUse, StoreError
    from common.salvage import salvage as salvage_store

    try:
        report = salvage_store(data_dir)
    except (StoreError, DataDirInUse) as exc:  # (in use: its process still runs)
        typer.echo(f"salvage: {exc}", err=True)
        raise typer.Exit(3) from None
    typer.echo(f"salvaged {report.kept} records of {report.store}")
    if report.lost_keys:
        shown = ", ".join(report.lost_keys[:20]) + (" …" if len(report.lost_keys) > 20 else "")
        typer.echo(f"{len(report.lost_keys)} records its key index names could not be read "
                   f"({shown}): written back unreadable, for the restart to set aside "
                   "(README: Guarantees)")
    if not report.index_whole:
        typer.echo("its key index could not be read whole: records lost with it are not "
                   "named")
    if report.lost_ranges:
        shown = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}"
                          for lo, hi in report.lost_ranges[:20])
        more = " …" if len(report.lost_ranges) > 20 else ""
        typer.echo(f"unreadable: {report.lost_rows} row ids ({shown}{more}): their records, "
                   "if they held any, are lost")
    if report.gave_up_at is not None:
        typer.echo(f"gave up at row id {report.gave_up_at}: nothing after it was read")
    typer.echo(f"the damaged store is kept as {report.damaged_copy}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A benchmark: the NAME of benchmarks/NAME.py.")],
) -> None:
    """Run benchmarks/NAME.py from the repository (extra arguments go to it, e.g. --json)."""
    from common.bench import run_benchmark

    raise typer.Exit(run_benchmark(name, list(ctx.args)))
