"""The `djs` command: runs the proxy, a node, or a whole local cluster, and talks to a node
over the same line protocol that netcat users type."""

from __future__ import annotations

import asyncio
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
) -> None:
    """Start a proxy and N nodes on this machine (ports 8080, 9000...), until Ctrl-C."""
    from common.cluster import run_cluster

    env = {"ALLOW_SHELL": "1"} if allow_shell else {}
    raise typer.Exit(asyncio.run(run_cluster(nodes, proxy_port, first_port, data, slots,
                                             host, env)))


def _client(node_address: str) -> LineClient:
    host, port = parse_address(node_address, 9000)
    return LineClient(host, port)


@app.command()
def submit(
    job: Annotated[list[str], typer.Argument(
        help="A job as typed in netcat: '1500', 'fib 90', 'sh echo hi'.")],
    node_address: NodeOption = "127.0.0.1:9000",
) -> None:
    """Submit one job; print its ticket."""
    words = job if not (len(job) == 1 and job[0].isdigit()) else ["sleep", job[0]]
    with _client(node_address) as client:
        reply = client.ask("submit " + " ".join(words))
    if not reply.startswith("Ticket ID: "):
        typer.echo(reply, err=True)
        raise typer.Exit(1)
    typer.echo(reply.removeprefix("Ticket ID: "))


@app.command()
def result(ticket: str, node_address: NodeOption = "127.0.0.1:9000") -> None:
    """Print a ticket's result (exit 2 while it is pending)."""
    with _client(node_address) as client:
        reply = client.ask(f"result {ticket}")
    _finish(reply)


@app.command()
def wait(
    ticket: str,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 30.0,
    node_address: NodeOption = "127.0.0.1:9000",
) -> None:
    """Block until a ticket's result is there, then print it (exit 2 on timeout)."""
    with _client(node_address) as client:
        client.settimeout(timeout + 10)
        reply = client.ask(f"wait {ticket} {timeout:g}")
    _finish(reply)


def _finish(reply: str) -> None:
    if reply.startswith("Result: FAILED: "):
        typer.echo(reply.removeprefix("Result: FAILED: "))
        raise typer.Exit(1)
    if reply.startswith("Result: "):
        typer.echo(reply.removeprefix("Result: "))
        return
    typer.echo(reply, err=True)
    raise typer.Exit(2 if reply.startswith("Result has not") else 1)


@app.command()
def health(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a node's client port or of "
                                           "the proxy.")] = "127.0.0.1:9000",
    proxy_port: Annotated[bool, typer.Option(
        "--proxy", help="The address is a proxy: check that it accepts connections.")
    ] = False,
) -> None:
    """Exit 0 if the process answers: a node must reply to `stats`, a proxy must accept.
    Docker's HEALTHCHECK runs this."""
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
        typer.echo(f"unhealthy: {reply}", err=True)
        raise typer.Exit(1)
    typer.echo(reply)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A benchmark: the NAME of benchmarks/NAME.py.")],
) -> None:
    """Run benchmarks/NAME.py from the repository (extra arguments go to it, e.g. --json)."""
    from common.bench import run_benchmark

    raise typer.Exit(run_benchmark(name, list(ctx.args)))
