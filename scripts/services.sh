#!/usr/bin/env bash
# Runs the real servers the tests talk to, each on 127.0.0.1, with config,
# data, logs and pidfiles under .services/ (git-ignored).
#
#   scripts/services.sh start|stop|status <service>...
#   scripts/services.sh kill-broker|start-broker kafka3 1|2|3
#   services: kafka kafka3 redis prometheus temporal all
#
#   kafka       1 Kafka broker, KRaft combined mode   127.0.0.1:9092 (controller 9093)
#   kafka3      3 Kafka brokers, 3-voter KRaft quorum 127.0.0.1:9192,9292,9392 (controllers +1)
#   redis       Debian redis-server, no persistence   127.0.0.1:6390
#   prometheus  Debian prometheus, scrapes itself     127.0.0.1:9095
#   temporal    temporal-test-server (PyPI)           127.0.0.1:7233
#
# start is idempotent (already running = success), waits until each server
# really answers and prints how long that took; stop is idempotent too
# (SIGTERM to the process group, SIGKILL after a deadline). status prints one
# line per server and exits 3 if any asked-for server is not running.
# Needs scripts/install-services.sh to have run once.
#
# Env: SPINA_SERVICES_DIR   data folder (default <repo>/.services)
#      SPINA_SERVICES_START_TIMEOUT  seconds to wait for readiness (default 90)
#      PYTHON               interpreter with confluent-kafka (default python3)
#      TEMPORAL_TEST_SERVER path of the executable (default: found via PYTHON)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SPINA_SERVICES_DIR:-$REPO_ROOT/.services}"
PYTHON="${PYTHON:-python3}"
START_TIMEOUT="${SPINA_SERVICES_START_TIMEOUT:-90}"
STOP_TIMEOUT=30
KAFKA_LIBS="$DIR/kafka/libs"

HOST=127.0.0.1
KAFKA_PORT=9092             # controller listener on KAFKA_PORT+1
KAFKA3_PORTS=(9192 9292 9392)  # idem, each +1
REDIS_PORT=6390             # not 6379: a system redis may own that
PROM_PORT=9095              # not 9090: idem for a system prometheus
TEMPORAL_PORT=7233

ALL=(redis temporal prometheus kafka kafka3)  # the order of launch and output

say() { printf '%s\n' "$*"; }
err() { printf 'services.sh: %s\n' "$*" >&2; }
die() { err "ERROR: $*"; exit 1; }
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
before() { awk -v d="$1" -v n="$EPOCHREALTIME" 'BEGIN { exit !(n < d) }'; }
deadline_in() { awk -v s="$1" -v n="$EPOCHREALTIME" 'BEGIN { printf "%.3f", n + s }'; }

# ------------------------------------------------------------ processes ----

# pid_alive PID MARKER: PID runs (not a zombie) and its command line contains
# MARKER, so a stale pidfile whose pid got reused is not taken for our server.
pid_alive() {
  local pid=$1 marker=$2 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ ${stat%% *} != Z ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"
}

# Prints the pid of a live instance (see instances), or nothing.
instance_pid() {
  local pidfile=$1 marker=$2 pid
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if pid_alive "$pid" "$marker"; then echo "$pid"; fi
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# launch PIDFILE LOG CMD...: runs CMD detached in its own session (so stop can
# signal the whole process group), stdin/stdout/stderr off the caller's pipes
# (so a pytest subprocess capturing output does not hang on them), and
# without fd 9, the start/stop lock, which a server must not keep holding.
launch() {
  local pidfile=$1 logfile=$2; shift 2
  echo "=== $(date -Is) services.sh: $*" >>"$logfile"
  setsid "$@" </dev/null >>"$logfile" 2>&1 9>&- &
  echo $! >"$pidfile"
}

# One tab-separated line per server process: pidfile, marker (a substring of
# its command line), ports it listens on (space-separated).
instances() {
  local i p
  case $1 in
    kafka) inst "$DIR/kafka/kafka.pid" "$DIR/kafka/server.properties" "$KAFKA_PORT $((KAFKA_PORT + 1))" ;;
    kafka3)
      for i in 1 2 3; do
        p=${KAFKA3_PORTS[i - 1]}
        inst "$DIR/kafka3/node$i/kafka.pid" "$DIR/kafka3/node$i/server.properties" "$p $((p + 1))"
      done ;;
    # redis rewrites its process title to "redis-server <bind>:<port>"
    redis) inst "$DIR/redis/redis.pid" "redis-server $HOST:$REDIS_PORT" "$REDIS_PORT" ;;
    prometheus) inst "$DIR/prometheus/prometheus.pid" "$DIR/prometheus/prometheus.yml" "$PROM_PORT" ;;
    temporal) inst "$DIR/temporal/temporal.pid" "temporal-test-server $TEMPORAL_PORT" "$TEMPORAL_PORT" ;;
  esac
}
inst() { printf '%s\t%s\t%s\n' "$@"; }

address() {
  case $1 in
    kafka) echo "$HOST:$KAFKA_PORT" ;;
    kafka3) echo "$HOST:${KAFKA3_PORTS[0]},$HOST:${KAFKA3_PORTS[1]},$HOST:${KAFKA3_PORTS[2]}" ;;
    redis) echo "redis://$HOST:$REDIS_PORT/0" ;;
    prometheus) echo "http://$HOST:$PROM_PORT" ;;
    temporal) echo "$HOST:$TEMPORAL_PORT" ;;
  esac
}

# Pids of the live processes of a service (one per line).
live_pids() {
  local pidfile marker ports
  while IFS=$'\t' read -r pidfile marker ports; do
    instance_pid "$pidfile" "$marker"
  done < <(instances "$1")
}

log_files() {  # one per line
  case $1 in
    kafka) printf '%s\n' "$DIR"/kafka/{server,stdout}.log ;;
    kafka3) printf '%s\n' "$DIR"/kafka3/node{1,2,3}/{server,stdout}.log ;;
    redis) printf '%s\n' "$DIR"/redis/{launch,redis}.log ;;
    prometheus) echo "$DIR/prometheus/prometheus.log" ;;
    temporal) echo "$DIR/temporal/temporal.log" ;;
  esac
}

show_logs() {
  local f
  while read -r f; do
    [[ -s $f ]] || continue
    err "---- last lines of $f ----"
    tail -n 25 "$f" >&2
  done < <(log_files "$1")
}

# ---------------------------------------------------------------- kafka ----

require_kafka() {
  command -v java >/dev/null || die "java not found (run scripts/install-services.sh)"
  ls "$KAFKA_LIBS"/kafka_2.13-*.jar >/dev/null 2>&1 \
    || die "no Kafka jars in $KAFKA_LIBS (run scripts/install-services.sh)"
  "$PYTHON" -c 'import confluent_kafka' 2>/dev/null \
    || die "$PYTHON cannot import confluent_kafka (run scripts/install-services.sh)"
}

# kafka_config DIR NODE_ID PORT VOTERS RF MIN_ISR: writes server.properties
# and log4j2.properties for one combined broker+controller node.
kafka_config() {
  local d=$1 id=$2 port=$3 voters=$4 rf=$5 isr=$6
  mkdir -p "$d/data"
  cat >"$d/server.properties" <<EOF
# generated by scripts/services.sh; edits are overwritten on start
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://$HOST:$port,CONTROLLER://$HOST:$((port + 1))
advertised.listeners=PLAINTEXT://$HOST:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$d/data
# test-friendly: topics appear on first use, groups join without delay
auto.create.topics.enable=true
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
# small footprint: 3 brokers + the rest share 2 cores
num.network.threads=2
num.io.threads=4
log.cleaner.dedupe.buffer.size=8388608
log.retention.hours=24
EOF
  cat >"$d/log4j2.properties" <<EOF
# generated by scripts/services.sh: broker log to a size-capped file
status = warn
# Kafka stops itself on SIGTERM; log4j's own hook only adds a warning then.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $d/server.log
appender.file.filePattern = $d/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
EOF
}

# kafka_java DIR: sets KJAVA to the java command line for the node in DIR
# (an array, not a function, because setsid must exec it).
kafka_java() {
  local d=$1
  # Small heap; C1-only JIT starts ~1s faster on 2 cores. A benchmark
  # wanting full-speed brokers sets SPINA_KAFKA_JAVA_OPTS="-Xmx1g".
  read -r -a KJAVA <<<"java ${SPINA_KAFKA_JAVA_OPTS:--Xms128m -Xmx512m -XX:TieredStopAtLevel=1}"
  # Kafka's own GC choice unless the options pick a collector (e.g. -XX:+UseZGC).
  [[ " ${KJAVA[*]} " == *" -XX:+Use"*"GC "* ]] || KJAVA+=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20)
  KJAVA+=(-XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$d/log4j2.properties"
    -cp "$KAFKA_LIBS/*")
}

# Formats a node's log dir once (KRaft needs meta.properties + bootstrap
# checkpoint before the first start). Static voters => no --standalone.
kafka_format() {
  local d=$1 cluster_id=$2
  [[ -f $d/data/meta.properties ]] && return 0
  kafka_java "$d"
  "${KJAVA[@]}" kafka.tools.StorageTool format --ignore-formatted \
    -t "$cluster_id" -c "$d/server.properties" >"$d/format.log" 2>&1 \
    || { cat "$d/format.log" >&2; die "kafka storage format failed in $d"; }
}

new_cluster_id() {  # a random Kafka Uuid: 16 bytes, base64url, unpadded
  "$PYTHON" -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))'
}

cluster_id_of() {  # one id per cluster, kept beside the nodes' dirs
  local f="$1/cluster.id"
  [[ -s $f ]] || new_cluster_id >"$f"
  cat "$f"
}

launch_kafka_node() {
  local d=$1
  kafka_java "$d"
  launch "$d/kafka.pid" "$d/stdout.log" "${KJAVA[@]}" kafka.Kafka "$d/server.properties"
}

# Launch functions start whatever is not running; they do not wait.
launch_kafka() {
  local d="$DIR/kafka"
  kafka_config "$d" 1 "$KAFKA_PORT" "1@$HOST:$((KAFKA_PORT + 1))" 1 1
  kafka_format "$d" "$(cluster_id_of "$d")"
  launch_kafka_node "$d"
}

launch_kafka3() {
  local i voters="" cid pidfile marker ports p
  local -a formats=()
  for i in 1 2 3; do
    voters+="${voters:+,}$i@$HOST:$((KAFKA3_PORTS[i - 1] + 1))"
  done
  mkdir -p "$DIR/kafka3"
  cid="$(cluster_id_of "$DIR/kafka3")"
  i=0
  while IFS=$'\t' read -r pidfile marker ports; do
    i=$((i + 1))
    [[ -z "$(instance_pid "$pidfile" "$marker")" ]] || continue
    kafka_config "$DIR/kafka3/node$i" "$i" "${KAFKA3_PORTS[i - 1]}" "$voters" 3 2
    kafka_format "$DIR/kafka3/node$i" "$cid" &  # 3 JVMs: format in parallel
    formats+=($!)
  done < <(instances kafka3)
  for p in "${formats[@]}"; do wait "$p" || die "kafka3: storage format failed"; done
  i=0
  while IFS=$'\t' read -r pidfile marker ports; do
    i=$((i + 1))
    [[ -n "$(instance_pid "$pidfile" "$marker")" ]] || launch_kafka_node "$DIR/kafka3/node$i"
  done < <(instances kafka3)
}

# Ready = every broker answers an ApiVersions request on its own port (a
# KRaft broker only processes requests once the controller has unfenced it,
# whereas its TCP port accepts earlier, and after an unclean stop metadata can
# still list the old registration) AND metadata lists all of them. Exits 2 at
# once if a broker process has died. The raw request keeps this free of any
# client's routing: ApiVersions v0 is answered by every Kafka version.
KAFKA_WAIT_PY='
import socket, struct, sys, time
from confluent_kafka.admin import AdminClient
bootstrap, want, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pids = sys.argv[4:]
ports = [int(hp.rsplit(":", 1)[1]) for hp in bootstrap.split(",")]

def dead(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True

def serving(port):
    req = struct.pack(">hhih", 18, 0, 7, 6) + b"spina!"  # ApiVersions v0, corr id 7
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(struct.pack(">i", len(req)) + req)
            data = b""
            while len(data) < 10:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            corr, err = struct.unpack(">ih", data[4:10])
            return corr == 7 and err == 0
    except OSError:
        return False

admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0,
                     "reconnect.backoff.max.ms": 250})
while True:
    if any(dead(p) for p in pids):
        sys.exit(2)
    try:
        if all(serving(p) for p in ports) and len(admin.list_topics(timeout=1).brokers) >= want:
            sys.exit(0)
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit(1)
    time.sleep(0.1)
'

wait_kafka_like() {  # SERVICE BROKERS DEADLINE
  local rc=0
  # shellcheck disable=SC2046  # one pid per word
  "$PYTHON" -c "$KAFKA_WAIT_PY" "$(address "$1")" "$2" "$3" $(live_pids "$1") || rc=$?
  case $rc in
    0) return 0 ;;
    2) err "$1: a broker process exited during startup" ;;
    *) err "$1: not all $2 broker(s) served requests within ${START_TIMEOUT}s" ;;
  esac
  return 1
}
ready_kafka() { wait_kafka_like kafka 1 "$1"; }
ready_kafka3() { wait_kafka_like kafka3 3 "$1"; }

# ---------------------------------------------------------------- redis ----

launch_redis() {
  local d="$DIR/redis"
  command -v redis-server >/dev/null || die "redis-server not found (run scripts/install-services.sh)"
  mkdir -p "$d"
  rm -f "$d/redis.pid"  # a stale one would look like "exited during startup"
  # Redis daemonizes itself (own session) and writes the pidfile.
  redis-server --bind "$HOST" --port "$REDIS_PORT" --protected-mode yes \
    --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" --dir "$d" \
    --save '' --appendonly no </dev/null >>"$d/launch.log" 2>&1 9>&- \
    || die "redis-server failed to launch: $(tail -n 5 "$d/launch.log")"
}

probe_redis() { [[ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

# ----------------------------------------------------------- prometheus ----

launch_prometheus() {
  local d="$DIR/prometheus"
  command -v prometheus >/dev/null || die "prometheus not found (run scripts/install-services.sh)"
  mkdir -p "$d/data"
  cat >"$d/prometheus.yml" <<EOF
# generated by scripts/services.sh: Prometheus scraping only itself
global:
  scrape_interval: 2s
  evaluation_interval: 15s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["$HOST:$PROM_PORT"]
EOF
  promtool check config "$d/prometheus.yml" >/dev/null \
    || die "promtool rejected $d/prometheus.yml"
  launch "$d/prometheus.pid" "$d/prometheus.log" prometheus \
    --config.file="$d/prometheus.yml" --storage.tsdb.path="$d/data" \
    --storage.tsdb.retention.time=1d --web.listen-address="$HOST:$PROM_PORT"
}

probe_prometheus() { curl -fsS -m 2 -o /dev/null "http://$HOST:$PROM_PORT/-/ready" 2>/dev/null; }

# ------------------------------------------------------------- temporal ----

temporal_exe() {
  local exe="${TEMPORAL_TEST_SERVER:-}"
  # pip puts it in the interpreter's scripts dir, which may not be on PATH.
  [[ -n $exe ]] || exe="$("$PYTHON" -c 'import os,sysconfig;print(os.path.join(sysconfig.get_path("scripts"),"temporal-test-server"))' 2>/dev/null || true)"
  [[ -x $exe ]] || exe="$(command -v temporal-test-server || true)"
  [[ -x $exe ]] || die "temporal-test-server not found (run scripts/install-services.sh)"
  echo "$exe"
}

launch_temporal() {
  local d="$DIR/temporal" exe
  exe="$(temporal_exe)"
  mkdir -p "$d"
  # CLI: temporal-test-server <port> [--enable-time-skipping]. It has no bind
  # address option and listens on all interfaces; clients use 127.0.0.1.
  launch "$d/temporal.pid" "$d/temporal.log" "$exe" "$TEMPORAL_PORT"
}

probe_temporal() { port_open "$TEMPORAL_PORT"; }

# ------------------------------------------------------------- commands ----

# For servers with a cheap probe: poll it, fail fast if the process died.
ready_by_probe() {  # SERVICE DEADLINE
  local svc=$1 deadline=$2 pids
  while ! "probe_$svc"; do
    pids="$(live_pids "$svc")"
    # redis writes its pidfile a moment after forking: only judge once it has.
    if [[ -z $pids && ( $svc != redis || -s "$DIR/redis/redis.pid" ) ]]; then
      err "$svc: process exited during startup"; return 1
    fi
    before "$deadline" || { err "$svc: not ready after ${START_TIMEOUT}s"; return 1; }
    sleep 0.1
  done
}
ready_redis() { ready_by_probe redis "$1"; }
ready_prometheus() { ready_by_probe prometheus "$1"; }
ready_temporal() { ready_by_probe temporal "$1"; }

running_count() { live_pids "$1" | grep -c . || true; }
instance_count() { instances "$1" | grep -c .; }

cmd_start() {
  local svc pidfile marker ports p t0 failed=0
  mkdir -p "$DIR"
  # One start/stop at a time (e.g. parallel pytest workers all calling start).
  exec 9>"$DIR/.lock"
  flock -w 300 9 || die "timed out waiting for $DIR/.lock"

  # Check everything before launching anything, so a failure leaves no
  # half-started set behind.
  local -a todo=()
  for svc in "$@"; do
    [[ $(running_count "$svc") == $(instance_count "$svc") ]] && continue
    todo+=("$svc")
    # A port taken by something we did not start would make us wait in vain.
    while IFS=$'\t' read -r pidfile marker ports; do
      [[ -z "$(instance_pid "$pidfile" "$marker")" ]] || continue
      for p in $ports; do
        if port_open "$p"; then
          die "$svc: port $HOST:$p is in use by a process not started from $DIR (stop it, or check 'ss -ltnp')"
        fi
      done
    done < <(instances "$svc")
    if [[ $svc == kafka* ]]; then require_kafka; fi
  done

  # Servers boot in parallel: each is launched, then waited for in the
  # background while the next one launches, so each printed time is its own.
  local -A waiter=()
  for svc in "$@"; do
    if [[ " ${todo[*]} " == *" $svc "* ]]; then
      t0=$EPOCHREALTIME
      "launch_$svc"
      wait_ready "$svc" "$t0" "" &
    else
      wait_ready "$svc" "$EPOCHREALTIME" 1 &
    fi
    waiter[$svc]=$!
  done
  for svc in "$@"; do
    wait "${waiter[$svc]}" || failed=1
  done
  return $failed
}

wait_ready() {  # SERVICE LAUNCH_TIME WAS_RUNNING
  local svc=$1 start=$2 was_running=$3
  if "ready_$svc" "$(deadline_in "$START_TIMEOUT")"; then
    if [[ -n $was_running ]]; then
      say "$svc already running on $(address "$svc")"
    else
      say "$svc ready on $(address "$svc") in $(secs_since "$start")s"
    fi
  else
    show_logs "$svc"
    err "ERROR: $svc failed to start (logs under $DIR/$svc)"
    return 1
  fi
}

cmd_stop() {
  local svc pid pidfile marker ports
  local -a pids=()
  local -A svc_of=()
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock -w 300 9 || die "timed out waiting for $DIR/.lock"

  for svc in "$@"; do
    while IFS=$'\t' read -r pidfile marker ports; do
      pid="$(instance_pid "$pidfile" "$marker")"
      # The process group too (setsid'ed): nothing it spawned is orphaned.
      [[ -z $pid ]] || { pids+=("$pid"); svc_of[$pid]=$svc; kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; }
    done < <(instances "$svc")
  done

  # All at once, so stopping kafka3 waits ~one broker shutdown, not three.
  local deadline signal=TERM lone_since=""
  local -a left
  deadline="$(deadline_in "$STOP_TIMEOUT")"
  while :; do
    left=()
    for pid in "${pids[@]}"; do
      pid_alive "$pid" "" && left+=("$pid")
    done
    ((${#left[@]})) || break
    # A kafka3 node left alone has no controller quorum (1 of 3 voters), so its
    # controlled shutdown can never be approved: it would wait minutes.
    if [[ $signal == TERM ]] && kafka3_lone_node "${left[@]}"; then
      lone_since=${lone_since:-$EPOCHREALTIME}
      if ! before "$(awk -v a="$lone_since" 'BEGIN { printf "%.3f", a + 10 }')"; then
        deadline=0
      fi
    fi
    if ! before "$deadline"; then
      [[ $signal == TERM ]] || die "pids ${left[*]} survived SIGKILL"
      for pid in "${left[@]}"; do
        err "${svc_of[$pid]} (pid $pid) still running after SIGTERM: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      done
      signal=KILL
      deadline="$(deadline_in 10)"
    fi
    sleep 0.1
  done

  for svc in "$@"; do
    while IFS=$'\t' read -r pidfile marker ports; do rm -f "$pidfile"; done < <(instances "$svc")
    say "$svc stopped"
  done
}

# kafka3_lone_node PID...: of the live pids being stopped, exactly one is a
# kafka3 node. (Uses cmd_stop's svc_of.)
kafka3_lone_node() {
  local pid n=0
  for pid in "$@"; do [[ ${svc_of[$pid]} == kafka3 ]] && n=$((n + 1)); done
  ((n == 1))
}

cmd_status() {
  local svc n total rc=0
  for svc in "$@"; do
    n=$(running_count "$svc"); total=$(instance_count "$svc")
    if ((n == total)); then
      say "$svc: running on $(address "$svc") (pid $(live_pids "$svc" | paste -sd,))"
    elif ((n > 0)); then
      say "$svc: DEGRADED $n/$total processes running on $(address "$svc")"; rc=3
    else
      say "$svc: stopped ($(address "$svc"))"; rc=3
    fi
  done
  return $rc
}

# kill-broker kafka3 N: SIGKILL broker N (a crash: no controlled shutdown),
# for durability tests. start-broker kafka3 N starts it again (the others
# are running, so only N is launched) and waits until all three serve.
cmd_kill_broker() {
  local n=$1 i=0 pid pidfile marker ports
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock -w 300 9 || die "timed out waiting for $DIR/.lock"
  while IFS=$'\t' read -r pidfile marker ports; do
    i=$((i + 1))
    ((i == n)) || continue
    pid="$(instance_pid "$pidfile" "$marker")"
    if [[ -z $pid ]]; then say "kafka3 broker $n is not running"; return 0; fi
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    while pid_alive "$pid" ""; do sleep 0.05; done
    rm -f "$pidfile"
    say "kafka3 broker $n killed (pid $pid)"
  done < <(instances kafka3)
}

cmd_start_broker() {
  local t0=$EPOCHREALTIME
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock -w 300 9 || die "timed out waiting for $DIR/.lock"
  require_kafka
  launch_kafka3
  wait_ready kafka3 "$t0" ""
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

main() {
  (($# >= 2)) || usage
  local cmd=$1 svc; shift
  case $cmd in
    kill-broker | start-broker)
      [[ $# == 2 && $1 == kafka3 && $2 =~ ^[123]$ ]] || { err "usage: $cmd kafka3 1|2|3"; exit 2; }
      "cmd_${cmd//-/_}" "$2"
      return ;;
  esac
  local -a svcs=()
  for svc in "$@"; do
    case $svc in
      all) svcs+=("${ALL[@]}") ;;
      kafka | kafka3 | redis | prometheus | temporal) svcs+=("$svc") ;;
      *) err "unknown service '$svc'"; usage ;;
    esac
  done
  # Keep ALL's order, drop duplicates.
  local -a ordered=()
  for svc in "${ALL[@]}"; do
    [[ " ${svcs[*]} " == *" $svc "* ]] && ordered+=("$svc")
  done
  case $cmd in
    start) cmd_start "${ordered[@]}" ;;
    stop) cmd_stop "${ordered[@]}" ;;
    status) cmd_status "${ordered[@]}" ;;
    *) usage ;;
  esac
}

main "$@"
