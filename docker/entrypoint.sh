#!/bin/sh
# Container entry point: start the OpenAI-compatible server from SUBSPEC_* environment variables.
#
#   SUBSPEC_CONFIG   YAML preset (default /app/configs/default.yaml; set it empty for no preset)
#   SUBSPEC_MODEL    overrides the preset's model: a hub id, a directory or a .gguf file under /models
#   SUBSPEC_API_KEY  require this bearer key on /v1 requests and the API docs; the server reads it from
#                    the environment, so it never appears on a command line (ps, /proc/*/cmdline)
#   SUBSPEC_MAX_QUEUE  requests waiting beyond the one running before the server answers 429
#   PORT             listening port (default 8000); a `--port` argument wins, and the port served is written
#                    to SUBSPEC_PORT_FILE (default /tmp/subspec.port), where the health check reads it
# Other SUBSPEC_<FIELD> / SUBSPEC_SPECULATION_<FIELD> variables reach the engine config directly.
#
# Arguments that start with '-' are appended to `subspec serve` (they come last, so they win);
# anything else runs as a command instead (`docker run IMAGE bash`, `docker run IMAGE subspec --help`).
set -eu

if [ "$#" -gt 0 ] && [ "$1" = "serve" ]; then
  shift
fi
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi

# An empty variable means 'not set': the engine would otherwise read SUBSPEC_MODEL= as model null.
for name in SUBSPEC_MODEL SUBSPEC_API_KEY SUBSPEC_MAX_QUEUE; do
  eval "value=\${$name-}"
  if [ -z "$value" ]; then
    unset "$name"
  fi
done

# POSIX sh has no arrays: prepend our options to "$@" so that the caller's options stay last.
if [ -n "${SUBSPEC_MAX_QUEUE-}" ]; then
  set -- --max-queue "$SUBSPEC_MAX_QUEUE" "$@"
fi
if [ -n "${SUBSPEC_MODEL-}" ]; then
  set -- --model "$SUBSPEC_MODEL" "$@"
fi
config=${SUBSPEC_CONFIG-/app/configs/default.yaml}
if [ -n "$config" ]; then
  set -- --config "$config" "$@"
fi

# The health check runs outside this process: tell it the port served (the last --port wins, as in argparse).
port=${PORT:-8000}
previous=
for arg in "$@"; do
  case "$previous" in --port) port=$arg ;; esac
  case "$arg" in --port=*) port=${arg#--port=} ;; esac
  previous=$arg
done
echo "$port" > "${SUBSPEC_PORT_FILE:-/tmp/subspec.port}" || echo "subspec-entrypoint: cannot write the port file; the health check assumes port ${PORT:-8000}" >&2

exec subspec serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
