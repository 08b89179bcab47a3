"""Every error this project raises on purpose, under one root."""


class SchedulerError(Exception):
    """Root of the errors raised by djs itself."""


class ProtocolError(SchedulerError):
    """A frame or a message broke the node-proxy protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed: close that connection, serve everyone else."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix announced more bytes than any legitimate frame carries."""


class LocalProtocolError(ProtocolError):
    """We were about to send something malformed: a bug on our side."""


class ProxyUnavailable(SchedulerError):
    """The reverse proxy cannot be reached right now."""


class InvalidJob(SchedulerError):
    """A submission was refused before a ticket was issued (bad type or arguments)."""


class UnknownJob(SchedulerError):
    """A ticket that this node never issued."""


class StoreError(SchedulerError):
    """Stable storage failed (full disk, read-only or corrupted file)."""


class DataDirInUse(SchedulerError):
    """Another process holds the data directory (two of them would corrupt its store)."""
