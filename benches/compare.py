#!/usr/bin/env python3
"""ringlb, HAProxy and nginx stream side by side on loopback, with ratios to the best peer.

    python3 benches/compare.py --bin target/release/ringlb            # full run, about 10 minutes
    python3 benches/compare.py --bin target/release/ringlb --quick    # a few seconds per figure
    python3 benches/compare.py --connlog --figures close --relay copy --peers haproxy
                                   # conn/s with connection logs on and off, HAProxy with tcplog

Needs iperf3, wrk and nginx (the HTTP backend); HAProxy and nginx's stream module
(`apt-get install haproxy nginx libnginx-mod-stream iperf3 wrk`) are compared when present.
Python 3 standard library only. Every balancer gets 2 workers (ringlb `workers = 2`, HAProxy
`nbthread 2`, nginx `worker_processes 2`) and the same fd limit, and talks to the same backends:

  bulk        iperf3 -c -> balancer -> iperf3 -s, 1 and 4 streams: Gbit/s and balancer CPU s per GB
              (and how busy the receiving iperf3 was: near a whole core, it sets the rate)
  lean        the same with lean load tools (compare.py itself): a sender per stream that sends
              one 256 KiB buffer over and over, a receiver that discards with MSG_TRUNC, so
              the balancer, not the tools, takes most of the machine: Gbit/s and CPU s per GB
  keepalive   wrk -t2 -c64 -> balancer -> nginx `return 200`: req/s and balancer CPU us per request
              (--wrk-threads N for another thread count)
  close       the same with `-H 'Connection: close'`: conn/s and balancer CPU us per connection
              (both also report how much of the machine was idle and how busy wrk was)
  idle        N connections (default 10,000; fd limit 24,000), each after one echoed line, held
              open: RSS KiB and fds per connection over the balancer's idle baseline, and how many
              of the N failed

--connlog starts a private rsyslogd (apt-get install rsyslog) on a loopback UDP port, runs every
ringlb column twice, without and with `[frontend.log]` sending HAProxy-format lines to it (column
"+log"), gives HAProxy `option tcplog` with `log` to the same rsyslogd, and reports ringlb's
log-on / log-off ratio per figure.

CPU is utime+stime from /proc/PID/stat of every process of the balancer (ringlb, HAProxy, the nginx
master and workers), as a delta over the load run; RSS and fds are summed over the same processes.
--on-cpu adds, for keepalive and close, the CPU counted by whole-machine sampling (`perf record -a`,
samples with the balancer's threads running / rate), which does not depend on the scheduler's
accounting (docs/performance.md, "CPU per connection: what /proc shows").
Each figure starts a fresh balancer. ringlb runs once per `--relay` mode; a mode that
`ringlb check` refuses is skipped. The report (date, machine, commit, a Markdown table) goes to
stdout, progress to stderr. Everything started here is stopped by its pid, also on Ctrl-C.
"""
import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Samples per second per CPU of --on-cpu's `perf record -a`.
ON_CPU_HZ = 1000
STREAM_SO = "/usr/lib/nginx/modules/ngx_stream_module.so"
HTTP_BODY = "hello from the benchmark backend\n"


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and /proc


def proc_stat(pid):
    """(session id, utime+stime in seconds) of one process, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # rest[0] is field 3 (state): session is field 6, utime 14, stime 15.
    return int(rest[3]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def session_pids(sid):
    """Every live process in session `sid` (each balancer is started as a session leader)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st and st[0] == sid:
                pids.append(int(name))
    return pids


def cpu_seconds(sid):
    return sum(st[1] for st in map(proc_stat, session_pids(sid)) if st)


def rss_kib(sid):
    total = 0
    for pid in session_pids(sid):
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def fd_count(sid):
    total = 0
    for pid in session_pids(sid):
        try:
            total += len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            pass
    return total


def nofile_limit(pid):
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError):
        pass
    return None


def listening(port):
    """True once some socket listens on 127.0.0.1:port (read from /proc, no probe connection)."""
    want = "0100007F:%04X" % port
    try:
        with open("/proc/net/tcp") as f:
            return any(l.split()[1] == want and l.split()[3] == "0A" for l in list(f)[1:])
    except OSError:
        return False


class Procs:
    """Starts processes as session leaders and stops each by its pid."""

    def __init__(self, tmp):
        self.tmp, self.live, self.n = tmp, [], 0

    def start(self, name, argv, nofile=None):
        self.n += 1
        logf = os.path.join(self.tmp, "%02d-%s.log" % (self.n, name))

        def pre():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(logf, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pre)
        p.logf, p.name = logf, name
        self.live.append(p)
        return p

    def wait_listen(self, p, port, timeout=10):
        end = time.time() + timeout
        while time.time() < end:
            if p.poll() is not None:
                raise RuntimeError("%s exited (%s): %s" % (p.name, p.returncode, tail(p.logf)))
            if listening(port):
                time.sleep(0.3)  # every worker/thread past its start
                return
            time.sleep(0.05)
        raise RuntimeError("%s did not listen on 127.0.0.1:%d: %s" % (p.name, port, tail(p.logf)))

    def stop(self, p):
        pids = session_pids(p.pid)
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(8)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in [p.pid] + pids:  # the leader if it ignored SIGTERM, and any worker left over
            if (proc_stat(pid) or (None,))[0] == p.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in reversed(list(self.live)):
            self.stop(p)


def tail(path, n=400):
    try:
        return open(path, errors="replace").read()[-n:].strip()
    except OSError:
        return ""


_ports = set()


def free_port():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports:
            _ports.add(port)
            return port


def have(cmd):
    return shutil.which(cmd) is not None


def first_line(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


# ---------------------------------------------------------------- backends


def nginx_temp_paths(d):
    return "".join("  %s_temp_path %s;\n" % (k, os.path.join(d, k))
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def start_http_backend(procs, tmp, port):
    """nginx (1 worker) answering every request with a small static 200, keep-alive unlimited."""
    d = os.path.join(tmp, "http-backend")
    os.makedirs(d)
    cfg = os.path.join(d, "nginx.conf")
    with open(cfg, "w") as f:
        f.write("daemon off;\nmaster_process on;\nworker_processes 1;\npid %s/nginx.pid;\n"
                "error_log %s/error.log warn;\nevents { worker_connections 4096; }\n"
                "http {\n  access_log off;\n%s  keepalive_requests 1000000;\n  keepalive_timeout 10m;\n"
                "  server {\n    listen 127.0.0.1:%d;\n    location / { default_type text/plain; return 200 \"%s\"; }\n"
                "  }\n}\n" % (d, d, nginx_temp_paths(d), port, HTTP_BODY.replace("\n", "\\n")))
    p = procs.start("http-backend", ["nginx", "-p", d + "/", "-e", d + "/error.log", "-c", cfg])
    procs.wait_listen(p, port)
    return p


async def echo_server(port):
    async def echo(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except Exception:
            pass
        finally:
            w.close()

    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
    srv = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096)
    async with srv:
        await srv.serve_forever()


def lean_server(port):
    """The lean bulk backend: reads every connection to EOF with MSG_TRUNC, which discards
    the bytes in the kernel without copying them out, one thread per connection."""
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port))
    l.listen(256)
    buf = bytearray(4 << 20)

    def drain(c):
        try:
            while c.recv_into(buf, len(buf), socket.MSG_TRUNC) > 0:
                pass
        except OSError:
            pass
        c.close()

    while True:
        c, _ = l.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()


def lean_client(port, streams, secs):
    """The lean bulk sender: `streams` connections, one thread each, sending the same 256 KiB
    buffer (in the cache: the kernel's copy of it is the only one) for `secs` seconds; prints
    the bytes sent. Up to a few MB of them are still in socket buffers at the end, under 0.1%
    of a run."""
    data = memoryview(os.urandom(256 * 1024))
    sent = [0] * streams
    end = time.monotonic() + secs
    failed = []

    def one(i):
        try:
            with socket.create_connection(("127.0.0.1", port)) as s:
                while time.monotonic() < end:
                    sent[i] += s.send(data)
        except OSError as e:
            failed.append("stream %d after %d bytes: %s" % (i, sent[i], e))

    ts = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if failed:
        sys.exit("; ".join(failed))
    print(sum(sent))


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------- balancers


class Column:
    def __init__(self, key, title, kind, relay=None, log=None, binary=None, extra=()):
        self.key, self.title, self.kind, self.relay = key, title, kind, relay
        # The UDP port of the rsyslogd connection logs go to, or None for no log.
        self.log = log
        # The ringlb (or ringloop) binary of this column: --bin, --bin-b or --ringloop.
        self.binary = binary
        # More arguments of a ringloop column (--ringloop-args).
        self.extra = list(extra)
        # The log of the column's latest balancer process.
        self.logf = None
        self.peer = kind not in ("ringlb", "ringloop")


def ringlb_config(path, port, backend, relay, log=None):
    # "MODE@IO" also sets [global] io, e.g. "copy@epoll" for the epoll runtime.
    mode, _, io = relay.partition("@")
    with open(path, "w") as f:
        f.write('[global]\nworkers = 2\nrelay = "%s"\nio = "%s"\nshutdown_timeout = "1s"\n'
                '[admin]\nlisten = ""\n'
                '[[frontend]]\nname = "bench"\nlisten = ["127.0.0.1:%d"]\nbalance = "round-robin"\n'
                'idle_timeout = "10m"\n%s[[frontend.backend]]\nname = "b"\naddress = "127.0.0.1:%d"\n'
                'check = false\n' % (mode, io or "auto", port,
                                     '[frontend.log]\ntarget = "syslog+udp://127.0.0.1:%d"\n' % log if log else "",
                                     backend))


def ringlb_check(binary, tmp, relay):
    """None if ringlb accepts `relay = <relay>`, else the reason it gave."""
    cfg = os.path.join(tmp, "check-%s.toml" % relay)
    ringlb_config(cfg, 1, 2, relay)
    r = subprocess.run([binary, "check", "--config", cfg], capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return None
    why = " ".join((r.stderr + r.stdout).replace(cfg + ":", "").split())
    return why[-300:] or "exit %d" % r.returncode


def start_balancer(col, args, procs, tmp, backend, nofile):
    port = free_port()
    d = tempfile.mkdtemp(prefix=col.key + "-", dir=tmp)
    if col.kind == "ringlb":
        cfg = os.path.join(d, "ringlb.toml")
        ringlb_config(cfg, port, backend, col.relay, col.log)
        argv = [col.binary, "run", "--config", cfg]
    elif col.kind == "ringloop":
        # The bound of an own per-core loop (benches/ringloop.rs): 2 threads, copy relay.
        argv = [col.binary, "--workers", "2", "--listen", "127.0.0.1:%d" % port,
                "--backend", "127.0.0.1:%d" % backend] + col.extra
    elif col.kind == "haproxy":
        # No maxconn: HAProxy derives it from the fd limit (it refuses to start when an explicit
        # maxconn needs more fds than the limit allows, and cannot raise the limit here).
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            log_global = "  log 127.0.0.1:%d local0\n" % col.log if col.log else ""
            log_defaults = "  log global\n  option tcplog\n" if col.log else ""
            f.write("global\n  nbthread 2\n%sdefaults\n  mode tcp\n  timeout connect 2s\n"
                    "  timeout client 10m\n  timeout server 10m\n%s%s"
                    "frontend f\n  bind 127.0.0.1:%d\n  default_backend b\nbackend b\n  server s1 127.0.0.1:%d\n"
                    % (log_global, log_defaults, "  option splice-auto\n" if col.relay == "splice-auto" else "",
                       port, backend))
        argv = ["haproxy", "-db", "-f", cfg]
    else:
        cfg = os.path.join(d, "nginx.conf")
        load = "load_module %s;\n" % STREAM_SO if os.path.exists(STREAM_SO) else ""
        # worker_connections counts both sides of a proxied connection; each worker process has
        # its own fd limit.
        with open(cfg, "w") as f:
            f.write("%sdaemon off;\nmaster_process on;\nworker_processes 2;\npid %s/nginx.pid;\n"
                    "error_log %s/error.log warn;\nevents { worker_connections %d; }\n"
                    "stream {\n  upstream b { server 127.0.0.1:%d; }\n"
                    "  server { listen 127.0.0.1:%d reuseport; proxy_pass b; proxy_timeout 10m; }\n}\n"
                    % (load, d, d, nofile, backend, port))
        argv = ["nginx", "-p", d + "/", "-e", d + "/error.log", "-c", cfg]
    p = procs.start(col.key, argv, nofile=nofile)
    col.logf = p.logf
    procs.wait_listen(p, port)
    return p, port


# ---------------------------------------------------------------- figures


def start_rsyslog(procs, tmp):
    """A private rsyslogd on a loopback UDP port, writing what it gets to a file; its port."""
    binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not os.access(binary, os.X_OK):
        sys.exit("--connlog needs rsyslogd (apt-get install rsyslog)")
    port = free_port()
    d = tempfile.mkdtemp(prefix="rsyslog-", dir=tmp)
    conf = os.path.join(d, "rsyslog.conf")
    with open(conf, "w") as f:
        f.write('global(workDirectory="%s")\nmodule(load="imudp")\n'
                'input(type="imudp" address="127.0.0.1" port="%d")\n'
                '*.* action(type="omfile" file="%s/messages")\n' % (d, port, d))
    pidfile = os.path.join(d, "rsyslogd.pid")
    p = procs.start("rsyslogd", [binary, "-n", "-f", conf, "-i", pidfile])
    end = time.time() + 10
    while not os.path.exists(pidfile):
        if p.poll() is not None or time.time() > end:
            raise RuntimeError("rsyslogd did not start: %s" % tail(p.logf))
        time.sleep(0.05)
    return port


def run_iperf(port, streams, secs):
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(secs), "-P", str(streams), "-J"]
    for attempt in range(3):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 60)
        try:
            out = json.loads(r.stdout)
        except ValueError:
            out = {"error": (r.stdout + r.stderr).strip()[-200:] or "no output"}
        if "busy" in out.get("error", "") and attempt < 2:  # the server still ends the last test
            time.sleep(1)
            continue
        return out
    return out


def iperf_load(port, streams, args, env):
    """One iperf3 run: GB received, Gbit/s, and the receiving iperf3's CPU share (% of a core)
    and CPU s per GB. iperf3 before 3.16 receives on one thread: near a whole core, it and
    not the balancer sets the rate."""
    r0, t0 = cpu_seconds(env["iperf_pid"]), time.time()
    out = run_iperf(port, streams, args.duration)
    rcv, secs = cpu_seconds(env["iperf_pid"]) - r0, time.time() - t0
    if "error" in out:
        raise RuntimeError("iperf3: " + out["error"])
    s = out["end"]["sum_received"]
    gb = s["bytes"] / 1e9
    return gb, s["bits_per_second"] / 1e9, (100.0 * rcv / secs if secs else None,
                                            rcv / gb if gb else None)


def lean_load(port, streams, args, env):
    """One run of the lean load (`lean_client` to `lean_server`): GB sent, Gbit/s. The sender
    copies from one buffer in the cache and the receiver copies nothing, so the balancer, not
    the tools, takes most of the machine."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--lean-client",
                        "%d,%d,%d" % (port, streams, args.duration)],
                       capture_output=True, text=True, timeout=args.duration + 60)
    if r.returncode != 0 or not r.stdout.strip().isdigit():
        raise RuntimeError("lean client: " + (r.stdout + r.stderr).strip()[-300:])
    gb = int(r.stdout) / 1e9
    return gb, gb * 8 / args.duration, ()


def fig_bulk(streams, load=iperf_load, backend="iperf_port"):
    """Gbit/s and the balancer's CPU s per GB, then what `load` adds of its own."""
    def run(col, args, procs, tmp, env):
        p, port = start_balancer(col, args, procs, tmp, env[backend], env["nofile"])
        try:
            vals = []
            for _ in range(args.repeat):
                c0 = cpu_seconds(p.pid)
                gb, rate, extra = load(port, streams, args, env)
                cpu = cpu_seconds(p.pid) - c0
                vals.append((rate, cpu / gb if gb else None) + tuple(extra))
            return vals, ""
        finally:
            procs.stop(p)
    return run


def children_cpu():
    """CPU seconds of this process's children that have been waited for (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


WRK_REQ = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def on_cpu_start(args, tmp):
    """With --on-cpu: a whole-machine `perf record` for one load run (see `on_cpu_seconds`)."""
    if not args.on_cpu:
        return None
    out = os.path.join(tmp, "oncpu.data")
    argv = ["perf", "record", "-a", "-F", str(ON_CPU_HZ), "-o", out, "--", "sleep", str(args.duration)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def on_cpu_seconds(rec, sid):
    """CPU seconds the processes of session `sid` were seen running on any CPU by the
    whole-machine sampling `on_cpu_start` began: samples / rate. Unlike /proc's utime+stime,
    this does not depend on how the scheduler accounts a thread's time (docs/performance.md,
    "CPU per connection: what /proc shows")."""
    if rec is None:
        return None
    p, out = rec
    p.wait()
    pids = set(session_pids(sid))
    threads = set()
    for pid in pids:
        try:
            threads.update(int(t) for t in os.listdir("/proc/%d/task" % pid))
        except OSError:
            pass
    r = subprocess.run(["perf", "report", "-i", out, "--sort", "pid", "--stdio", "-n"],
                       capture_output=True, text=True, timeout=120)
    samples = 0
    for line in r.stdout.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\d+):", line)
        if m and (int(m.group(2)) in threads or int(m.group(2)) in pids):
            samples += int(m.group(1))
    return samples / ON_CPU_HZ


def machine_idle(since=None):
    """The machine's idle and iowait jiffies and all jiffies so far (/proc/stat); given an
    earlier reading, the percentage of the time between the two that was idle. A closed-loop
    load (wrk -c 64) on the balancer's own cores leaves CPU idle when the balancer's latency,
    or the load generator, not CPU, is the limit."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    now = (v[3] + v[4], sum(v))
    if since is None:
        return now
    total = now[1] - since[1]
    return 100.0 * (now[0] - since[0]) / total if total else None


def fig_http(close):
    def run(col, args, procs, tmp, env):
        p, port = start_balancer(col, args, procs, tmp, env["http_port"], env["nofile"])
        url = "http://127.0.0.1:%d/" % port
        argv = ["wrk", "-t", str(args.wrk_threads), "-c", "64"] + (["-H", "Connection: close"] if close else [])
        try:
            if args.warmup:
                subprocess.run(argv + ["-d", "%ds" % args.warmup, url], capture_output=True,
                               timeout=args.warmup + 60)
            vals, notes = [], []
            for _ in range(args.repeat):
                c0 = cpu_seconds(p.pid)
                rec = on_cpu_start(args, tmp)
                m0, w0 = machine_idle(), children_cpu()
                r = subprocess.run(argv + ["-d", "%ds" % args.duration, url], capture_output=True,
                                   text=True, timeout=args.duration + 60)
                cpu = cpu_seconds(p.pid) - c0
                idle = machine_idle(m0)
                # wrk's own CPU (it is the only child waited for during the run).
                wrk_cpu = 100.0 * (children_cpu() - w0) / args.duration
                on_cpu = on_cpu_seconds(rec, p.pid)
                m = WRK_REQ.search(r.stdout)
                if r.returncode != 0 or not m:
                    raise RuntimeError("wrk: " + (r.stdout + r.stderr).strip()[-300:])
                reqs = int(m.group(1))
                secs = float(m.group(2)) * {"ms": 1e-3, "s": 1, "m": 60}.get(m.group(3), 1)
                vals.append((reqs / secs, cpu / reqs * 1e6 if reqs else None,
                             on_cpu / reqs * 1e6 if reqs and on_cpu is not None else None, idle, wrk_cpu))
                e, n = WRK_ERR.search(r.stdout), WRK_NON2XX.search(r.stdout)
                if e and any(int(x) for x in e.groups()):
                    notes.append("wrk socket errors: connect %s, read %s, write %s, timeout %s" % e.groups())
                if n:
                    notes.append("%s non-2xx responses" % n.group(1))
            return vals, "; ".join(notes)
        finally:
            procs.stop(p)
    return run


async def hold_idle(port, n, conc, per_conn_timeout, deadline):
    """Open n connections to 127.0.0.1:port, one echoed line each; return (writers held, failures)."""
    held, fails, sem = [], collections.Counter(), asyncio.Semaphore(conc)
    end = time.monotonic() + deadline

    async def one(i):
        async with sem:
            if time.monotonic() > end:
                fails["not tried (deadline)"] += 1
                return
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), per_conn_timeout)
                line = b"idle %d\n" % i
                w.write(line)
                got = await asyncio.wait_for(r.readline(), per_conn_timeout)
                if got != line:
                    raise EOFError("closed" if not got else "wrong echo")
                held.append(w)
                w = None
            except asyncio.TimeoutError:
                fails["timeout"] += 1
            except EOFError as e:
                fails[str(e)] += 1
            except OSError as e:
                fails[os.strerror(e.errno) if e.errno else type(e).__name__] += 1
            finally:
                if w is not None:
                    try:
                        w.close()
                    except RuntimeError:  # the loop is gone (interrupted)
                        pass

    await asyncio.gather(*(one(i) for i in range(n)))
    return held, fails


def fig_idle(col, args, procs, tmp, env):
    p, port = start_balancer(col, args, procs, tmp, env["echo_port"], env["nofile"])
    try:
        time.sleep(0.5)
        rss0, fd0 = rss_kib(p.pid), fd_count(p.pid)
        limit = nofile_limit(p.pid)

        async def go():
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
            held, fails = await hold_idle(port, env["idle_n"], 256, 5, 60 if args.quick else 120)
            await asyncio.sleep(2)
            rss1, fd1 = rss_kib(p.pid), fd_count(p.pid)
            for w in held:
                w.close()
            await asyncio.sleep(0.2)
            return len(held), fails, rss1, fd1

        nheld, fails, rss1, fd1 = asyncio.run(go())
        n = nheld or None  # no per-connection figure when none was held
        note = "held %d, %d MiB total" % (nheld, rss1 // 1024)
        if fails:
            note += "; failed: " + ", ".join("%d %s" % (c, k) for k, c in fails.most_common())
        if limit != env["nofile"]:
            note += "; fd limit in effect %s" % limit
        return [((rss1 - rss0) / n if n else None, (fd1 - fd0) / n if n else None, sum(fails.values()))], note
    finally:
        procs.stop(p)


def median_pairs(vals):
    vals = sorted(vals, key=lambda v: v[0])
    return vals[len(vals) // 2]


# figure key -> (function, [(row label, index in the figure's tuple, higher is better, format)])
FIGURES = collections.OrderedDict([
    ("bulk1", (fig_bulk(1), [("bulk, 1 stream (Gbit/s)", 0, True, "%.1f"),
                             ("CPU per GB, 1 stream (CPU s)", 1, False, "%.2f"),
                             ("iperf3 receiver busy, 1 stream (% of a core)", 2, None, "%.0f"),
                             ("iperf3 receiver CPU per GB, 1 stream (CPU s)", 3, None, "%.2f")])),
    ("bulk4", (fig_bulk(4), [("bulk, 4 streams (Gbit/s)", 0, True, "%.1f"),
                             ("CPU per GB, 4 streams (CPU s)", 1, False, "%.2f"),
                             ("iperf3 receiver busy, 4 streams (% of a core)", 2, None, "%.0f"),
                             ("iperf3 receiver CPU per GB, 4 streams (CPU s)", 3, None, "%.2f")])),
    ("lean1", (fig_bulk(1, lean_load, "lean_port"), [("bulk, lean load, 1 stream (Gbit/s)", 0, True, "%.1f"),
                             ("CPU per GB, lean load, 1 stream (CPU s)", 1, False, "%.2f")])),
    ("lean4", (fig_bulk(4, lean_load, "lean_port"), [("bulk, lean load, 4 streams (Gbit/s)", 0, True, "%.1f"),
                             ("CPU per GB, lean load, 4 streams (CPU s)", 1, False, "%.2f")])),
    ("keepalive", (fig_http(False), [("keep-alive req/s (wrk -c 64)", 0, True, "%.0f"),
                                     ("CPU per request (us)", 1, False, "%.1f"),
                                     ("on-CPU per request (us, perf -a; --on-cpu)", 2, False, "%.1f"),
                                     ("machine idle, keep-alive run (%)", 3, None, "%.1f"),
                                     ("wrk busy, keep-alive run (% of a core)", 4, None, "%.0f")])),
    ("close", (fig_http(True), [("Connection: close conn/s (wrk -c 64)", 0, True, "%.0f"),
                                ("CPU per connection (us)", 1, False, "%.1f"),
                                ("on-CPU per connection (us, perf -a; --on-cpu)", 2, False, "%.1f"),
                                ("machine idle, Connection: close run (%)", 3, None, "%.1f"),
                                ("wrk busy, Connection: close run (% of a core)", 4, None, "%.0f")])),
    ("idle", (fig_idle, [("RSS per idle connection (KiB)", 0, False, "%.1f"),
                         ("fds per idle connection", 1, False, "%.2f"),
                         ("idle connections failed", 2, None, "%d")])),
])


# ---------------------------------------------------------------- report


def fmt_num(fmt, v):
    s = fmt % v
    if fmt == "%.0f" or fmt == "%d":
        s = "{:,}".format(int(round(v)))
    return s


def table(cols, results, env):
    head = "| figure | " + " | ".join(c.title for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for key, (_, rows) in FIGURES.items():
        if key not in env["figures"]:
            continue
        for label, idx, higher, fmt in rows:
            if key in ("keepalive", "close") and idx == 0:
                label = label.replace("wrk -c", "wrk -t %d -c" % env["wrk_threads"])
            if key == "idle" and idx == 2:
                label = "idle connections failed (of {:,}, fd limit {:,})".format(env["idle_n"], env["nofile"])
            vals = {}
            for c in cols:
                r = results.get((key, c.key))
                vals[c.key] = r[0][idx] if r and r[0] is not None and idx < len(r[0]) else None
            if all(v is None for v in vals.values()):
                continue  # a row this run did not measure (--on-cpu)
            peer_vals = [vals[c.key] for c in cols if c.peer and vals[c.key] is not None]
            best = None
            if peer_vals and higher is not None:
                best = max(peer_vals) if higher else min(peer_vals)
            cells = []
            for c in cols:
                v = vals[c.key]
                if v is None:
                    cells.append("-")
                    continue
                s = fmt_num(fmt, v)
                if not c.peer and best:
                    s += " (%.2fx)" % (v / best)
                cells.append(s)
            arrow = "" if higher is None else (" ↑" if higher else " ↓")
            lines.append("| %s%s | %s |" % (label, arrow, " | ".join(cells)))
    return "\n".join(lines)


def git_rev(repo):
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "diff", "--quiet", "HEAD"], timeout=10).returncode
        return rev + ("-dirty" if dirty else "") if rev else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[2:]))
    ap.add_argument("--bin", default="target/release/ringlb", help="ringlb binary (default: %(default)s)")
    ap.add_argument("--bin-b", metavar="BIN",
                    help="a second ringlb binary (an A/B comparison): one more column per relay mode, "
                         "right after --bin's")
    ap.add_argument("--ringloop", metavar="BIN",
                    help="also run benches/ringloop.rs (`cargo bench --bench ringloop --no-run` builds "
                         "it): the bound of a minimal per-core io_uring loop, one more column (in its default "
                         "mode its idle rows mean nothing: it holds two 16 KiB buffers per connection; "
                         "with --pbuf they do)")
    ap.add_argument("--ringloop-args", metavar="ARGS", action="append",
                    help="extra arguments of the --ringloop column, one string (write it with =, e.g. "
                         "--ringloop-args=--pbuf); given more than once, one ringloop column each, so "
                         "--ringloop-args= --ringloop-args=--pbuf runs the default and --pbuf side by side")
    ap.add_argument("--relay", default="copy,splice,splice-auto",
                    help="ringlb relay modes, comma-separated; one column each; MODE@epoll runs "
                         "that mode on the epoll runtime (default: %(default)s)")
    ap.add_argument("--peers", default="haproxy,haproxy-splice,nginx",
                    help="peers to compare, of haproxy, haproxy-splice (option splice-auto), nginx (default: all)")
    ap.add_argument("--figures", default=",".join(FIGURES),
                    help="figures to run, of %s (default: all)" % ", ".join(FIGURES))
    ap.add_argument("--quick", action="store_true", help="3 s per figure, no warm-up: a smoke run")
    ap.add_argument("--wrk-threads", type=int, default=2,
                    help="wrk threads of the keepalive and close figures (default: %(default)s, the cores of the "
                         "machine these figures were taken on; with 1, wrk's one event loop is the critical "
                         "path and the three balancers come out level, see docs/performance.md)")
    ap.add_argument("--duration", type=int, help="seconds per load run (default: 15, --quick 3)")
    ap.add_argument("--repeat", type=int, default=1, help="load runs per figure; the median is reported")
    ap.add_argument("--rounds", type=int, default=1,
                    help="go round the balancers this many times per figure, every other round in reverse "
                         "(each round starts each balancer again and runs --repeat loads); the median is over "
                         "all rounds. Interleaving spreads the machine's drift over every column, where "
                         "--repeat runs one balancer's loads back to back (default: %(default)s)")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections to hold (default: %(default)s)")
    ap.add_argument("--fd-limit", type=int, default=24000,
                    help="RLIMIT_NOFILE of every balancer (default: %(default)s); if the hard limit is lower, "
                         "it is used and --idle is scaled down by the same factor")
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    ap.add_argument("--on-cpu", action="store_true",
                    help="also count the HTTP figures' CPU by whole-machine sampling (perf record -a)")
    ap.add_argument("--connlog", action="store_true",
                    help="each ringlb column also with a connection log to a private rsyslogd (+log), "
                         "HAProxy with option tcplog to the same one")
    ap.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)  # internal: the idle backend
    ap.add_argument("--lean-server", type=int, help=argparse.SUPPRESS)  # internal: the lean bulk backend
    ap.add_argument("--lean-client", help=argparse.SUPPRESS)  # internal: PORT,STREAMS,SECS
    args = ap.parse_args()

    if args.lean_server:
        try:
            lean_server(args.lean_server)
        except KeyboardInterrupt:
            pass
        return
    if args.lean_client:
        port, streams, secs = (int(x) for x in args.lean_client.split(","))
        lean_client(port, streams, secs)
        return
    if args.echo_server:
        raise_nofile()
        try:
            asyncio.run(echo_server(args.echo_server))
        except KeyboardInterrupt:
            pass
        return

    args.duration = args.duration or (3 if args.quick else 15)
    args.warmup = 0 if args.quick else 2
    args.bin = os.path.abspath(args.bin)
    args.bin_b = os.path.abspath(args.bin_b) if args.bin_b else None
    args.ringloop = os.path.abspath(args.ringloop) if args.ringloop else None
    figures = [f for f in args.figures.split(",") if f]
    for f in figures:
        if f not in FIGURES:
            ap.error("unknown figure %r" % f)
    if not os.access(args.bin, os.X_OK):
        ap.error("%s: not an executable (build with `cargo build --release`)" % args.bin)
    need = {"iperf3"} if {"bulk1", "bulk4"} & set(figures) else set()
    need |= {"wrk", "nginx"} if {"keepalive", "close"} & set(figures) else set()
    missing = sorted(c for c in need if not have(c))
    if missing:
        sys.exit("missing: %s (apt-get install %s)" % (", ".join(missing), " ".join(missing)))
    if args.on_cpu and not have("perf"):
        sys.exit("--on-cpu needs perf (apt-get install linux-perf) and may need root")

    # The fd limit every balancer gets; this process holds the idle clients, so it raises its own.
    hard = raise_nofile()
    nofile, idle_n = args.fd_limit, args.idle
    if hard < nofile:
        idle_n = int(args.idle * hard / nofile) // 100 * 100
        log("WARN: the hard fd limit here is %d < --fd-limit %d (raising it needs CAP_SYS_RESOURCE); "
            "using %d with %d idle connections (same fds per connection budget)" % (hard, nofile, hard, idle_n))
        nofile = hard

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: ignored in background jobs
        signal.signal(sig, on_signal)

    tmp = tempfile.mkdtemp(prefix="ringlb-compare-")
    procs = Procs(tmp)
    results, notes, skipped = {}, [], []
    started, load0 = time.time(), os.getloadavg()[0]
    try:
        cols = []
        log_port = start_rsyslog(procs, tmp) if args.connlog else None
        for relay in [r for r in args.relay.split(",") if r]:
            why = ringlb_check(args.bin, tmp, relay)
            if why:
                skipped.append("ringlb relay=%s: refused by `ringlb check`: %s" % (relay, why))
                log("skip ringlb %s: %s" % (relay, why))
            else:
                mode, _, io = relay.partition("@")
                title = "ringlb %s" % mode + (" (%s)" % io if io else "")
                cols.append(Column("ringlb-" + relay.replace("@", "-"), title, "ringlb", relay,
                                   binary=args.bin))
                if args.bin_b:
                    cols.append(Column("ringlb-b-" + relay.replace("@", "-"), title + " [B]", "ringlb",
                                       relay, binary=args.bin_b))
                if log_port:
                    cols.append(Column("ringlb-" + relay.replace("@", "-") + "-log", title + " +log",
                                       "ringlb", relay, log_port, binary=args.bin))
        if args.ringloop:
            for i, extra in enumerate(args.ringloop_args or [""]):
                extra = shlex.split(extra)
                title = " ".join(["ringloop"] + extra + ["(bound)"])
                cols.append(Column("ringloop" + ("-%d" % i if i else ""), title, "ringloop",
                                   binary=args.ringloop, extra=extra))
        hv = first_line(["haproxy", "-v"]) if have("haproxy") else ""
        hver = re.search(r"version (\d+\.\d+)", hv)
        hname = "HAProxy %s" % (hver.group(1) if hver else "")
        hv = hv.split(" - ")[0].replace("HAProxy version", "HAProxy")
        nv = first_line(["nginx", "-v"]).replace("nginx version: ", "") if have("nginx") else ""
        nver = re.search(r"nginx/(\d+\.\d+)", nv)
        for peer in [p for p in args.peers.split(",") if p]:
            if peer in ("haproxy", "haproxy-splice"):
                if not have("haproxy"):
                    skipped.append("%s: haproxy not installed" % peer)
                    continue
                cols.append(Column(peer, hname + (" splice-auto" if peer == "haproxy-splice" else "")
                                   + (" tcplog" if log_port else ""),
                                   "haproxy", "splice-auto" if peer == "haproxy-splice" else None, log_port))
            elif peer == "nginx":
                if not have("nginx"):
                    skipped.append("nginx: not installed")
                    continue
                built = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
                if not os.path.exists(STREAM_SO) and "--with-stream " not in built + " ":
                    skipped.append("nginx: no stream module (apt-get install libnginx-mod-stream)")
                    continue
                cols.append(Column("nginx", "nginx %s stream" % (nver.group(1) if nver else ""), "nginx"))
            else:
                ap.error("unknown peer %r" % peer)
        if not cols:
            sys.exit("nothing to measure")

        env = {"nofile": nofile, "idle_n": idle_n, "figures": figures, "wrk_threads": args.wrk_threads}
        if {"bulk1", "bulk4"} & set(figures):
            env["iperf_port"] = free_port()
            p = procs.start("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(env["iperf_port"])])
            procs.wait_listen(p, env["iperf_port"])
            env["iperf_pid"] = p.pid
        if {"keepalive", "close"} & set(figures):
            env["http_port"] = free_port()
            start_http_backend(procs, tmp, env["http_port"])
        if {"lean1", "lean4"} & set(figures):
            env["lean_port"] = free_port()
            p = procs.start("lean-backend", [sys.executable, os.path.abspath(__file__),
                                             "--lean-server", str(env["lean_port"])])
            procs.wait_listen(p, env["lean_port"])
        if "idle" in figures:
            env["echo_port"] = free_port()
            p = procs.start("echo-backend", [sys.executable, os.path.abspath(__file__),
                                             "--echo-server", str(env["echo_port"])])
            procs.wait_listen(p, env["echo_port"])

        log("%d balancers x %d figures, %d s per load run%s" % (
            len(cols), len(figures), args.duration, " (quick)" if args.quick else ""))
        # Figure by figure, every balancer in turn, so slow drift of the machine hits all alike;
        # with --rounds, the turn goes round that many times (every other one in reverse), and
        # the median is over the samples of all rounds.
        for key in figures:
            fn, rows = FIGURES[key]
            samples = collections.defaultdict(list)
            seen = collections.defaultdict(list)
            rounds = 1 if key == "idle" else args.rounds
            for rnd in range(rounds):
                for c in (cols if rnd % 2 == 0 else cols[::-1]):
                    try:
                        vals, note = fn(c, args, procs, tmp, env)
                    except RuntimeError as e:
                        vals, note = [], "error: %s" % e
                    if c.kind == "ringloop" and c.logf:
                        # Its counters (buffer ring exhausted, recvs paused, timeouts), printed
                        # when stopped.
                        stats = [l.strip() for l in open(c.logf, errors="replace") if "stopped by" in l]
                        if stats:
                            note = "; ".join(x for x in (note, stats[-1]) if x)
                    samples[c.key].extend(vals)
                    if note and note not in seen[c.key]:
                        seen[c.key].append(note)
                    med = median_pairs(vals) if vals else None
                    # Rows this run measures (the on-CPU ones only with --on-cpu).
                    shown = "-" if med is None else ", ".join(
                        "%s %s" % (fmt_num(fmt, med[idx]), label)
                        for label, idx, _, fmt in rows if idx < len(med) and med[idx] is not None)
                    log("%-10s %-26s %s%s%s" % (key, c.title, shown,
                                                ("   [" + note + "]") if note else "",
                                                "   (round %d of %d)" % (rnd + 1, rounds) if rounds > 1 else ""))
            for c in cols:
                note = "; ".join(seen[c.key])
                results[(key, c.key)] = (median_pairs(samples[c.key]) if samples[c.key] else None, note)
                if note:
                    notes.append("%s, %s: %s" % (key, c.title, note))
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(130)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("# ringlb vs HAProxy vs nginx stream (benches/compare.py%s)\n" % (" --quick" if args.quick else ""))
    print("- date: %s" % datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print("- machine: %s, %d CPUs, kernel %s" % (cpu_model(), os.cpu_count() or 0, platform.release()))
    where = "" if args.bin.startswith(repo + os.sep) else "; the binary is outside this work tree, so the commit may not be its"
    print("- ringlb: commit %s, %s (%s%s)" % (git_rev(repo), first_line([args.bin, "--version"]), args.bin, where))
    wrk = first_line(["wrk", "-v"]).split(" Copyright")[0] if have("wrk") else "wrk -"
    iperf = first_line(["iperf3", "--version"]).split(" (")[0] if have("iperf3") else "iperf3 -"
    print("- peers and tools: %s; %s; %s; %s" % (hv or "haproxy -", nv or "nginx -", wrk, iperf))
    print("- %d s per load run%s, median of %d%s; 2 workers/threads each; fd limit %d; wall time %.0f s; "
          "load average %.2f before, %.2f after\n"
          % (args.duration, ", %d s warm-up" % args.warmup if args.warmup else "", args.repeat * args.rounds,
             " (%d interleaved rounds of %d)" % (args.rounds, args.repeat) if args.rounds > 1 else "", nofile,
             time.time() - started, load0, os.getloadavg()[0]))
    print(table(cols, results, env))
    print("\n↑ higher is better, ↓ lower is better; (N.NNx) = ringlb / best peer (%s)."
          % ", ".join(c.title for c in cols if c.peer))
    if args.connlog:
        for c in cols:
            if c.kind != "ringlb" or not c.log:
                continue
            for key in figures:
                on = (results.get((key, c.key)) or (None,))[0]
                off = (results.get((key, c.key[:-len("-log")])) or (None,))[0]
                if on and off and on[0] and off[0]:
                    print("- %s, %s: connection log on / off = %.2fx" % (key, c.title, on[0] / off[0]))
    for s in skipped + notes:
        print("- " + s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": {k: v for k, v in env.items()}, "columns": [c.__dict__ for c in cols],
                       "results": {"%s/%s" % k: v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
