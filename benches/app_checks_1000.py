#!/usr/bin/env python3
"""1,000 backends with HTTP checks every 1 s: do the checks keep their interval?

Starts 1,000 tiny HTTP listeners on 127.0.0.1 (one asyncio loop), ringlb with one frontend
over them (kind = "http", path = "/health", interval = "1s"), lets the checks settle, then
counts the /health requests the listeners receive over a window and the CPU time ringlb's
control thread spent. A check that kept its interval gives 1,000 requests a second.

    python3 benches/app_checks_1000.py --ringlb target/release/ringlb [--seconds 20] [--https]

With --https the listeners speak TLS (a throwaway certificate made with the openssl command)
and the checks set tls = true: the cost of a handshake per check.

Loopback only; it stops by itself.
"""
import argparse, asyncio, os, ssl, subprocess, sys, tempfile, time

N = 1000  # --backends changes it


async def main(args):
    count = [0]

    async def serve(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            count[0] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except BaseException:  # a reset by the check, or the loop ending
            pass
        finally:
            writer.close()

    tls = None
    tmp = tempfile.mkdtemp()
    if args.https:
        cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=bench", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
    servers = [await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls) for _ in range(N)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    cfg = ['[global]\nworkers = 1\nmax_connections = 1000\n[admin]\nlisten = ""\n',
           '[[frontend]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n',
           '[frontend.health]\nkind = "http"\npath = "/health"\ninterval = "1s"\ntimeout = "500ms"\n'
           + ('tls = true\n' if args.https else '')]
    for i, p in enumerate(ports):
        cfg.append(f'[[frontend.backend]]\nname = "b{i}"\naddress = "127.0.0.1:{p}"\n')
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("\n".join(cfg))
        path = f.name
    lb = subprocess.Popen([args.ringlb, "run", "--config", path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(5)  # first checks are spread over one interval
        control = control_thread(lb.pid)
        cpu0, n0, t0 = cpu_ticks(lb.pid, control), count[0], time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu1, n1, t1 = cpu_ticks(lb.pid, control), count[0], time.monotonic()
        secs = t1 - t0
        rate = (n1 - n0) / secs
        hz = os.sysconf("SC_CLK_TCK")
        print(f"{N} backends, {'HTTPS' if args.https else 'HTTP'} checks, interval 1s: {n1 - n0} checks in {secs:.1f}s = {rate:.0f}/s "
              f"({rate / N:.3f} of the interval's rate); control thread CPU "
              f"{(cpu1 - cpu0) / hz / secs * 100:.1f}% of one core")
        return 0 if rate >= 0.9 * N else 1
    finally:
        lb.terminate()
        lb.wait()
        for s in servers:
            s.close()
        os.unlink(path)


def control_thread(pid):
    """The control thread (health checks, admin, reloads) is the process's main thread."""
    return str(pid)


def cpu_ticks(pid, tid):
    stat = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ringlb", default="target/release/ringlb")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--https", action="store_true")
    ap.add_argument("--backends", type=int, default=1000,
                    help="Python's TLS server does not keep up with 1,000 handshakes a second; "
                         "use fewer with --https")
    args = ap.parse_args()
    N = args.backends
    sys.exit(asyncio.run(main(args)))
