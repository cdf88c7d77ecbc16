#!/usr/bin/env bash
# Two ringlb nodes behind ECMP, announced with BGP: a lab in network namespaces on one machine.
#
#   sudo bash tests/scale-out.sh [path/to/ringlb]      (default: target/debug/ringlb)
#
# Needs root, iproute2, BIRD 2 (`apt-get install bird2`), python3. Builds this topology:
#
#   client (10.10.1.2 + 20 more source addresses)
#      |
#   router (BIRD, ECMP over BGP paths, fib_multipath_hash_policy = 1: L4 hashing)
#      |                   |                    |
#   node1 10.10.2.2     node2 10.10.3.2       backends 10.10.4.11-14:8080
#   (ringlb + BIRD,     (ringlb + BIRD,       (each answers its name)
#    VIP 10.99.0.1 on lo) VIP on lo)
#
# Each node's ringlb (balance = "maglev") announces the VIP through its BIRD while its frontend
# is ready (on_ready = birdc enable vip_web) and withdraws it otherwise. Checks, each failing
# the script with a message:
#   1. 10,000 flows (distinct source address and port) through the VIP: each node carries
#      30-70% of them, and asking each node directly with the same source gives the same
#      backend for every flow.
#   2. SIGKILL of a whole node (its ringlb and BIRD): the router drops its path within the BGP
#      hold time (3 s); afterwards every flow succeeds through the other node and keeps its
#      backend.
#   3. SIGTERM of a node's ringlb under constant connection load: it withdraws first and keeps
#      accepting for its grace period: 0 failed connections.
#   4. A node whose backends are all unreachable withdraws its VIP; it comes back when they do.
#   5. Both nodes export the same ringlb_maglev_table_fingerprint.
#   6. The router's BIRD restarts: both nodes announce again. A node's BIRD restarts (with the
#      VIP protocol disabled, as configured): ringlb's repeated on_ready announces it again.
# Everything started here is stopped and every namespace removed on exit, also on Ctrl-C.

set -euo pipefail

RINGLB=$(realpath "${1:-target/debug/ringlb}")
P=rlbso$$ # namespace prefix, unique per run
WORK=$(mktemp -d /tmp/ringlb-scale-out.XXXXXX)
PIDS=()
VIP=10.99.0.1
FLOWS=${RINGLB_SCALE_OUT_FLOWS:-10000}

log() { printf '[scale-out %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() {
  log "FAIL: $*"
  for f in "$WORK"/*.log; do
    [ -f "$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; }
  done
  exit 1
}

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in client router node1 node2 back; do ip netns del "$P-$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "scale-out: needs root (network namespaces)" >&2; exit 2; }
for tool in ip bird birdc python3; do
  command -v $tool >/dev/null || { echo "scale-out: $tool not found (apt-get install iproute2 bird2 python3)" >&2; exit 2; }
done
[ -x "$RINGLB" ] || { echo "scale-out: no ringlb binary at $RINGLB (cargo build)" >&2; exit 2; }

nsx() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }
# Starts a process in a namespace in the background and remembers its pid.
start() {
  local ns=$1 name=$2; shift 2
  ip netns exec "$P-$ns" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$name=$!"
}

# ------------------------------------------------------------------ topology
for ns in client router node1 node2 back; do
  ip netns add "$P-$ns"
  nsx $ns ip link set lo up
done
link() { # link NS_A IF_A ADDR_A NS_B IF_B ADDR_B
  ip link add "$2" netns "$P-$1" type veth peer name "$5" netns "$P-$4"
  nsx "$1" ip addr add "$3" dev "$2"; nsx "$1" ip link set "$2" up
  nsx "$4" ip addr add "$6" dev "$5"; nsx "$4" ip link set "$5" up
}
link client c0 10.10.1.2/24 router r-c 10.10.1.1/24
link router r-n1 10.10.2.1/24 node1 n1 10.10.2.2/24
link router r-n2 10.10.3.1/24 node2 n2 10.10.3.2/24
link router r-b 10.10.4.1/24 back b0 10.10.4.2/24
for i in $(seq 10 29); do nsx client ip addr add 10.10.1.$i/24 dev c0; done
for i in 11 12 13 14; do nsx back ip addr add 10.10.4.$i/24 dev b0; done
nsx client ip route add default via 10.10.1.1
nsx node1 ip route add default via 10.10.2.1
nsx node2 ip route add default via 10.10.3.1
nsx back ip route add default via 10.10.4.1
for n in node1 node2; do nsx $n ip addr add $VIP/32 dev lo; done
nsx router sysctl -qw net.ipv4.ip_forward=1
nsx router sysctl -qw net.ipv4.fib_multipath_hash_policy=1
# The client reuses a flow's source address and port to ask again; allow it past TIME_WAIT.
nsx client sysctl -qw net.ipv4.tcp_tw_reuse=1

# ------------------------------------------------------------------ BIRD
cat >"$WORK/router.conf" <<EOF
router id 10.10.1.1;
protocol device {}
protocol kernel { ipv4 { export all; }; merge paths on; }
template bgp node { local as 65000; hold time 3; keepalive time 1; connect retry time 1;
  error wait time 1, 2;
  ipv4 { import all; export none; }; }
protocol bgp node1 from node { neighbor 10.10.2.2 as 65001; }
protocol bgp node2 from node { neighbor 10.10.3.2 as 65001; }
EOF
for n in 1 2; do
  a=10.10.$((n + 1)).2
  cat >"$WORK/node$n.conf" <<EOF
router id $a;
protocol device {}
# The VIP route; ringlb's on_ready / on_unready enable and disable this protocol.
protocol static vip_web { disabled yes; ipv4; route $VIP/32 unreachable; }
protocol bgp uplink { local $a as 65001; neighbor 10.10.$((n + 1)).1 as 65000;
  hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 2;
  ipv4 { import none; export where proto = "vip_web"; }; }
EOF
done
start router bird_router bird -f -c "$WORK/router.conf" -s "$WORK/router.ctl" -P "$WORK/router.pid"
start_node_bird() {
  rm -f "$WORK/node$1.ctl"
  start node$1 bird_node$1 bird -f -c "$WORK/node$1.conf" -s "$WORK/node$1.ctl" -P "$WORK/node$1.pid"
  local deadline=$((SECONDS + 10))
  until [ -S "$WORK/node$1.ctl" ]; do
    local pid_var=PID_bird_node$1
    kill -0 "${!pid_var}" 2>/dev/null || fail "BIRD of node$1 exited"
    [ $SECONDS -lt $deadline ] || fail "BIRD of node$1 did not start"
    sleep 0.05
  done
}
start_node_bird 1
start_node_bird 2

# ------------------------------------------------------------------ backends
cat >"$WORK/backends.py" <<'EOF'
import asyncio, sys
async def main():
    async def serve(name, r, w):
        w.write(name.encode() + b"\n")
        try:
            await w.drain()
            w.close()
            await w.wait_closed()
        except OSError:
            pass
    servers = []
    for i in range(4):
        servers.append(await asyncio.start_server(
            lambda r, w, n="b%d" % (i + 1): serve(n, r, w), "10.10.4.%d" % (11 + i), 8080, backlog=1024))
    print("backends up", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))
asyncio.run(main())
EOF
start back backends python3 "$WORK/backends.py"
deadline=$((SECONDS + 10))
until grep -q "backends up" "$WORK/backends.log"; do
  [ $SECONDS -lt $deadline ] || fail "the backends did not start"
  sleep 0.05
done

# ------------------------------------------------------------------ ringlb nodes
for n in 1 2; do
  cat >"$WORK/ringlb$n.toml" <<EOF
[global]
workers = 2
max_connections = 5000
grace = "3s"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:9090"

[[frontend]]
name = "web"
listen = ["0.0.0.0:80"]
balance = "maglev"
hash_key = "ip-port"
connect_timeout = "1s"
on_ready = ["birdc", "-s", "$WORK/node$n.ctl", "enable", "vip_web"]
on_unready = ["birdc", "-s", "$WORK/node$n.ctl", "disable", "vip_web"]

[frontend.health]
interval = "200ms"
timeout = "200ms"
rise = 2
fall = 2

[[frontend.backend]]
name = "b1"
address = "10.10.4.11:8080"
[[frontend.backend]]
name = "b2"
address = "10.10.4.12:8080"
[[frontend.backend]]
name = "b3"
address = "10.10.4.13:8080"
[[frontend.backend]]
name = "b4"
address = "10.10.4.14:8080"
EOF
done
start_ringlb() { start node$1 ringlb$1 "$RINGLB" run --config "$WORK/ringlb$1.toml"; }
start_ringlb 1
start_ringlb 2

# How many paths the router has to the VIP (0, 1 or 2).
paths() {
  local r
  r=$(nsx router ip route show $VIP/32 2>/dev/null || true)
  if [ -z "$r" ]; then echo 0; elif grep -q nexthop <<<"$r"; then grep -c 'nexthop' <<<"$r"; else echo 1; fi
}
wait_paths() { # wait_paths N SECONDS WHAT
  local deadline=$((SECONDS + $2))
  while [ "$(paths)" != "$1" ]; do
    [ $SECONDS -lt $deadline ] || fail "$3: router has $(paths) paths to the VIP, expected $1"
    sleep 0.1
  done
}
log "waiting for both nodes to announce the VIP"
wait_paths 2 30 "start"
log "router: $(nsx router ip route show $VIP/32 | tr -s ' \n' ' ')"

# ------------------------------------------------------------------ the client
cat >"$WORK/client.py" <<'EOF'
"""Flows through the VIP or straight to a node, from fixed source addresses and ports.

    client.py flows N TARGET OUT.json     one flow per (source address, port); records backends
    client.py same IN.json TARGET          the same flows again: every backend must match
    client.py load SECONDS OUT             a new flow every few ms until SECONDS; counts failures
"""
import asyncio, json, socket, sys, time

SOURCES = ["10.10.1.%d" % i for i in range(10, 30)]

def flow(i):
    return SOURCES[i % len(SOURCES)], 20000 + i // len(SOURCES)

async def ask(target, src, timeout=3.0):
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setblocking(False)
    if src:
        s.bind(src)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(s, (host, int(port))), timeout)
        r, w = await asyncio.open_connection(sock=s)
        line = await asyncio.wait_for(r.readline(), timeout)
        w.close()
        return line.decode().strip() or "EOF"
    except (OSError, asyncio.TimeoutError) as e:
        s.close()
        return "ERR " + (type(e).__name__ if not str(e) else str(e))

async def many(target, idx, conc=100):
    out = {}
    sem = asyncio.Semaphore(conc)
    async def one(i):
        async with sem:
            out[i] = await ask(target, flow(i))
    await asyncio.gather(*(one(i) for i in idx))
    return out

def main():
    mode = sys.argv[1]
    if mode == "flows":
        n, target, path = int(sys.argv[2]), sys.argv[3], sys.argv[4]
        got = asyncio.run(many(target, range(n)))
        bad = {i: b for i, b in got.items() if not b.startswith("b")}
        json.dump({str(i): b for i, b in got.items()}, open(path, "w"))
        counts = {}
        for b in got.values():
            counts[b] = counts.get(b, 0) + 1
        print(json.dumps({"flows": n, "failed": len(bad), "backends": counts}))
        sys.exit(1 if bad else 0)
    if mode == "same":
        want = {int(i): b for i, b in json.load(open(sys.argv[2])).items()}
        target = sys.argv[3]
        idx = sorted(want)[: int(sys.argv[4])] if len(sys.argv) > 4 else sorted(want)
        got = asyncio.run(many(target, idx))
        diff = [i for i in idx if got[i] != want[i]]
        print(json.dumps({"flows": len(idx), "different": len(diff),
                          "examples": [(i, want[i], got[i]) for i in diff[:5]]}))
        sys.exit(1 if diff else 0)
    if mode == "load":
        secs, path = float(sys.argv[2]), sys.argv[3]
        async def run():
            fails, total, i = [], 0, 0
            end = time.monotonic() + secs
            tasks = set()
            async def one(k):
                nonlocal total
                b = await ask("%s:80" % "10.99.0.1", (SOURCES[k % 20], 40000 + (k // 20) % 20000))
                total += 1
                if not b.startswith("b"):
                    fails.append((time.time(), b))
            while time.monotonic() < end:
                t = asyncio.ensure_future(one(i)); tasks.add(t); t.add_done_callback(tasks.discard)
                i += 1
                await asyncio.sleep(0.004)
            await asyncio.gather(*tasks)
            return total, fails
        total, fails = asyncio.run(run())
        json.dump({"total": total, "failed": len(fails), "examples": fails[:5]}, open(path, "w"))
        print(json.dumps({"total": total, "failed": len(fails), "examples": fails[:5]}))
        sys.exit(0)
    sys.exit("unknown mode " + mode)

main()
EOF
client() { nsx client python3 "$WORK/client.py" "$@"; }
# The values of the series of NODE's /metrics whose lines start with NAME, one per line.
metric() {
  nsx "$1" python3 -c '
import sys, urllib.request
t = urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=5).read().decode()
print("\n".join(l.split()[-1] for l in t.splitlines() if l.startswith(sys.argv[1])))' "$2"
}
conns_total() { metric "$1" ringlb_frontend_connections_total | python3 -c 'import sys; print(sum(int(float(v)) for v in sys.stdin))'; }
fingerprint() { metric "$1" ringlb_maglev_table_fingerprint | head -n 1; }

# ------------------------------------------------------------------ 1. consistent, spread
f1=$(fingerprint node1); f2=$(fingerprint node2)
[ "$f1" = "$f2" ] || fail "Maglev fingerprints differ: node1 $f1, node2 $f2"
log "check 5: both nodes' Maglev tables have fingerprint $f1"

before1=$(conns_total node1); before2=$(conns_total node2)
log "check 1: $FLOWS flows through the VIP"
client flows "$FLOWS" $VIP:80 "$WORK/vip.json" || fail "flows through the VIP failed"
n1=$(( $(conns_total node1) - before1 )); n2=$(( $(conns_total node2) - before2 ))
log "node1 carried $n1, node2 $n2 of $FLOWS flows"
[ $((n1 + n2)) -eq "$FLOWS" ] || fail "nodes counted $((n1 + n2)) connections for $FLOWS flows"
for n in $n1 $n2; do
  [ $((n * 100)) -ge $((FLOWS * 30)) ] && [ $((n * 100)) -le $((FLOWS * 70)) ] \
    || fail "a node carried $n of $FLOWS flows, outside 30-70%"
done
log "asking each node directly with the same sources"
client same "$WORK/vip.json" 10.10.2.2:80 || fail "node1 answers differently from the VIP"
client same "$WORK/vip.json" 10.10.3.2:80 || fail "node2 answers differently from the VIP"

# ------------------------------------------------------------------ 2. a node dies
# A node that dies silently (hung, or cut off) sends nothing, not even a TCP reset for its BGP
# session: freeze its processes, so only the router's hold timer can notice, then kill them.
log "check 2: node1 hangs (SIGSTOP its ringlb and BIRD), then SIGKILL"
kill -STOP "$PID_ringlb1" "$PID_bird_node1"
hung=$(date +%s.%N)
wait_paths 1 10 "after node1 hung"
took=$(python3 -c "import sys,time; print('%.1f' % (time.time() - float(sys.argv[1])))" "$hung")
log "router dropped node1's path after $took s (BGP hold time 3 s)"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 4.5 else 1)" "$took" \
  || fail "withdrawal took $took s, longer than the hold time"
kill -9 "$PID_ringlb1" "$PID_bird_node1"
client same "$WORK/vip.json" $VIP:80 2000 || fail "flows lost their backend after node1 died"

# ------------------------------------------------------------------ 3. SIGTERM drains cleanly
log "bringing node1 back"
start_node_bird 1
start_ringlb 1
wait_paths 2 30 "after restarting node1"
client same "$WORK/vip.json" $VIP:80 2000 || fail "flows changed backend after node1 came back"
log "check 3: SIGTERM node1's ringlb under constant load"
client load 8 "$WORK/load.json" >"$WORK/load.out" &
LOAD=$!
PIDS+=($LOAD)
sleep 2
kill -TERM "$PID_ringlb1"
wait "$LOAD" || true
cat "$WORK/load.out" >&2
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["failed"] == 0 and d["total"] > 500 else 1)' "$WORK/load.json" \
  || fail "connections failed while node1 stopped: $(cat "$WORK/load.json")"
wait "$PID_ringlb1" 2>/dev/null || true
grep -q "still accepting for 3s (grace)" "$WORK/ringlb1.log" || fail "node1 did not log its grace period"
[ "$(paths)" = 1 ] || fail "node1's path is still announced after it stopped"

# ------------------------------------------------------------------ 4. no backend, no route
start_ringlb 1
wait_paths 2 30 "after starting node1 again"
log "check 4: node2 loses every backend"
nsx node2 ip route add prohibit 10.10.4.0/24
wait_paths 1 15 "after node2 lost its backends"
grep -q "frontend web is not ready: no backend is available" "$WORK/ringlb2.log" \
  || fail "node2 did not log that it is not ready"
client same "$WORK/vip.json" $VIP:80 1000 || fail "flows failed with node2 withdrawn"
nsx node2 ip route del prohibit 10.10.4.0/24
wait_paths 2 15 "after node2's backends came back"

# ------------------------------------------------------------------ 6. BIRD restarts
log "check 6: the router's BIRD restarts"
# The kernel keeps the routes BIRD installed while it is gone; once it is back, both sessions
# must come up and both paths be there again.
kill -9 "$PID_bird_router"
rm -f "$WORK/router.ctl"
start router bird_router bird -f -c "$WORK/router.conf" -s "$WORK/router.ctl" -P "$WORK/router.pid"
deadline=$((SECONDS + 30))
until [ "$(birdc -s "$WORK/router.ctl" show protocols 2>/dev/null | grep -c Established)" = 2 ]; do
  [ $SECONDS -lt $deadline ] || fail "BGP sessions did not come back after the router's BIRD restarted"
  sleep 0.2
done
wait_paths 2 30 "after the router's BIRD restarted"
log "check 6: node2's BIRD restarts (comes back with vip_web disabled; ringlb enables it again)"
kill -9 "$PID_bird_node2"
wait_paths 1 10 "after node2's BIRD died"
start_node_bird 2
restarted=$SECONDS
wait_paths 2 30 "after node2's BIRD restarted"
log "node2 announced again $((SECONDS - restarted)) s after its BIRD restarted (ringlb repeats on_ready every 10 s)"
client same "$WORK/vip.json" $VIP:80 1000 || fail "flows changed backend after the BIRD restarts"
log "PASS: every check held"
