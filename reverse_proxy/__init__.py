"""The reverse proxy: the cluster's one dispatcher. It keeps the global queue on disk,
balances jobs over the nodes by their free capacity, and carries results back to the node
each job was submitted to. It never runs a job itself. Entry point: `djs proxy`."""
