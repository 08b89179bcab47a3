#!/bin/sh
# Docker HEALTHCHECK of the djs image, for both of its commands.
#
#   role  $DJS_ROLE (node or proxy) if set, else the djs subcommand PID 1 runs: the
#         ENTRYPOINT makes PID 1 `/usr/bin/tini -- djs <command> [args...]` (or, with
#         `--entrypoint djs`, `python /opt/venv/bin/djs <command> [args...]`).
#   node  djs health 127.0.0.1:${CLIENT_PORT:-9000}          (must answer `stats`)
#   proxy djs health --proxy 127.0.0.1:${PROXY_PORT:-8080}   (must accept a connection)
#         `proxy PORT` and `--port PORT` on PID 1's command line win over the variables.
#
# DJS_HEALTHCHECK_CMDLINE names the file read instead of /proc/1/cmdline (tests use it).
set -euf  # -f: no globbing of the words split below

role=${DJS_ROLE:-}
port_arg=
cmdline=${DJS_HEALTHCHECK_CMDLINE:-/proc/1/cmdline}

if [ -r "$cmdline" ]; then
    # One positional per argument (NUL-separated); arguments hold no spaces here.
    # shellcheck disable=SC2046
    set -- $(tr '\0' ' ' <"$cmdline")
    while [ $# -gt 0 ] && [ "${1##*/}" != djs ]; do shift; done
    if [ $# -ge 2 ]; then
        command=$2
        shift 2
        [ -n "$role" ] || role=$command
        # `proxy PORT`: the original's positional port.
        if [ "$command" = proxy ] && [ $# -gt 0 ]; then
            case $1 in *[!0-9]* | '') ;; *) port_arg=$1 ;; esac
        fi
        while [ $# -gt 0 ]; do
            case $1 in
            --port=*) port_arg=${1#--port=} ;;
            --port) [ $# -lt 2 ] || port_arg=$2 ;;
            esac
            shift
        done
    fi
fi

case $role in
proxy) exec djs health --proxy "127.0.0.1:${port_arg:-${PROXY_PORT:-8080}}" ;;
node) exec djs health "127.0.0.1:${port_arg:-${CLIENT_PORT:-9000}}" ;;
*)
    echo "healthcheck: cannot tell the role (got '${role}'); set DJS_ROLE=node or proxy" >&2
    exit 1
    ;;
esac
