"""What an `sh` job may run, and with what around it. Pure: no processes here.

With SHELL_ALLOW set, a command is split like a shell would (shlex) and must start with one
of the allowed prefixes, word for word; it then runs without a shell, so `;`, `|`, `$(...)`
and redirections are plain arguments, not a way out of the allowlist. Without SHELL_ALLOW
(but ALLOW_SHELL=1) the command goes to /bin/sh as typed.

Every `sh` job gets a clean environment: a fixed PATH, a UTF-8 locale, HOME set to its own
working directory and DJS_JOB_DIR naming it (a restarted node finds the processes its last
life left running by it: cluster_node/leftovers.py); nothing of the node's environment
(CLUSTER_TOKEN, CLIENT_TOKEN, cloud credentials...) is passed on.
"""

from __future__ import annotations

import shlex

from common.errors import InvalidJob

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Names an `sh` job's directory in its environment, which its children inherit.
JOB_DIR_VARIABLE = "DJS_JOB_DIR"


def parse_prefixes(text: str) -> tuple[str, ...]:
    """SHELL_ALLOW ("echo, ls -l") as normalised prefixes ("echo", "ls -l")."""
    prefixes = []
    for part in text.split(","):
        words = shlex.split(part)
        if words:
            prefixes.append(shlex.join(words))
    return tuple(prefixes)


def allowed_argv(command: str, prefixes: tuple[str, ...]) -> list[str]:
    """The argv to exec for `command`, or InvalidJob when no prefix allows it."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidJob(f"sh command cannot be split into words: {exc}") from None
    for prefix in prefixes:
        words = shlex.split(prefix)
        if argv[:len(words)] == words:
            return argv
    raise InvalidJob(f"sh command not allowed on this node (SHELL_ALLOW: "
                     f"{', '.join(prefixes)})")


def clean_env(workdir: str) -> dict[str, str]:
    """The whole environment of an `sh` job."""
    return {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": workdir, "PWD": workdir,
            JOB_DIR_VARIABLE: workdir}
