#!/bin/sh
# Entrypoint of the pipeline services in deploy/docker/compose.test.yml, where every container shares
# the host's network: `--metrics-port N` of the service's command is replaced by a free port of its
# own (replicas of a scaled stage run the same command), written to /tmp/metrics-port so that
# `hostnet-entrypoint.sh --healthcheck` (the test's healthcheck) asks this container's /healthz.
set -eu
if [ "${1:-}" = "--healthcheck" ]; then
    exec python -c "import urllib.request
port = open('/tmp/metrics-port').read().strip()
urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3)"
fi
port=$(python -c "import socket
s = socket.socket()
s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
previous=""
for arg in "$@"; do
    shift
    if [ "$previous" = "--metrics-port" ]; then
        arg=$port
        echo "$port" > /tmp/metrics-port
    fi
    set -- "$@" "$arg"
    previous=$arg
done
exec pipeline "$@"
