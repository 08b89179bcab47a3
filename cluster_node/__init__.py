"""A cluster node: takes jobs from netcat clients (a ticket each, stored before it is
shown), forwards them to the reverse proxy, runs what the proxy hands it, and answers for
its own tickets. Three tasks: the client server, the proxy link, and the executor.
Entry point: `djs node`."""
