#!/usr/bin/env bash
# Builds Prometheus WITH consul_sd_configs (Debian's package is built without it) from the Go module proxy,
# for tests/services/test_prometheus.py::test_prometheus_consul_sd_discovers_every_instance
# (run with SPINA_PROMETHEUS_CONSUL_SD=1). Heavy: about 2 GB of modules and, on 2 cores, 15-30 minutes.
#
#   tests/go/prometheus/build.sh            # -> .services/go/bin/prometheus-consul-sd
#
# The module is built as a dependency of a throwaway main module under .services/go/prometheus-build,
# because `go install ...@version` refuses a module whose go.mod has replace or exclude directives.
# Env: PROMETHEUS_MODULE_VERSION (default v0.316.0, i.e. Prometheus 3.x), SPINA_SERVICES_DIR.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
SERVICES_DIR="${SPINA_SERVICES_DIR:-$REPO_ROOT/.services}"
VERSION="${PROMETHEUS_MODULE_VERSION:-v0.316.0}"
BUILD_DIR="$SERVICES_DIR/go/prometheus-build"
OUT="$SERVICES_DIR/go/bin/prometheus-consul-sd"

command -v go >/dev/null || { echo "build.sh: 'go' not found on PATH" >&2; exit 1; }
mkdir -p "$BUILD_DIR" "$(dirname "$OUT")"
cd "$BUILD_DIR"
[[ -f go.mod ]] || go mod init spina.local/prometheusbuild >/dev/null 2>&1
printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/prometheus/prometheus/cmd/prometheus"\n' >tools.go
go get "github.com/prometheus/prometheus/cmd/prometheus@$VERSION"
# nice: the machine is shared; a build that takes longer is better than tests that time out meanwhile.
nice -n 19 go build -o "$OUT.tmp" github.com/prometheus/prometheus/cmd/prometheus
mv "$OUT.tmp" "$OUT"
"$OUT" --version | head -1
