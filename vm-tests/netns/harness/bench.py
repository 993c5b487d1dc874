"""The benchmark mode (--bench): direct TCP against the tunnel with each
congestion controller under the WAN profiles, and fairness against Cubic."""

import json

from .net import ADDR, PROFILES, log, run
from .world import curl

# --- benchmark -----------------------------------------------------------

def measure(w, url, seconds, resolve="", probe=False):
    """One time-capped download; returns (bytes/s, bytes, median TCP
    connect time to the backend in s while it ran, or None). The connects
    cross the same bottleneck: their SYN-ACK queues behind the download's
    data, so connect time under load minus idle is the queueing delay the
    download adds."""
    dl = (f"curl -s --cacert {w.pki}/ca.crt {resolve} --max-time {seconds} -o /dev/null "
          f"-w 'D %{{size_download}} %{{time_appconnect}} %{{time_total}}\n' {url}")
    cmd = dl
    if probe:
        cmd = (f"{dl} & sleep 1.5; for i in 1 2 3 4 5 6 7 8; do "
               f"{connect_probe()}; sleep 0.4; done; wait")
    out = w.visitor.execute(cmd, timeout=seconds + 60)[1]
    probes = sorted(float(l.split()[1]) for l in out.splitlines()
                    if l.startswith("P ") and float(l.split()[1]) > 0)
    size, appc, total = next(l.split()[1:] for l in out.splitlines() if l.startswith("D "))
    size, appc, total = int(size), float(appc), float(total)
    return size / max(1e-6, total - appc), size, (probes[len(probes) // 2] if probes else None)


def connect_probe():
    return (f"curl -s -o /dev/null --max-time 5 -w 'P %{{time_connect}}\n' "
            f"http://{ADDR['backend']}:8080/")


def idle_connect(w, n=5):
    out = w.visitor.execute("; ".join([connect_probe()] * n), timeout=60)[1]
    times = sorted(float(l.split()[1]) for l in out.splitlines() if l.startswith("P "))
    return times[len(times) // 2] if times else 0.0


def latency(w, url, n, resolve=""):
    times = []
    for _ in range(n):
        out = w.visitor.succeed(
            f"curl -s --fail --cacert {w.pki}/ca.crt {resolve} --max-time 10 -o /dev/null "
            f"-w '%{{time_starttransfer}}' {url}")
        times.append(float(out))
    times.sort()
    return times[len(times) // 2]


CONTROLLERS = ("cubic", "bbr")


def path_stats(w, client):
    """The Client's Tunnel path counters (`client status --json`): lost
    packets in percent of those sent, and the congestion window in KiB."""
    out = run([w.bin, "client", "status", "--socket", client.socket, "--json"], check=False)
    try:
        p = json.loads(out.stdout)["tunnel"]["path"]
        return 100.0 * p["lost_packets"] / max(1, p["sent_packets"]), p["congestion_window"] / 1024
    except (ValueError, KeyError, TypeError):
        return float("nan"), float("nan")


def client_with(w, server, client, cc):
    """(Re)start the Client with `congestion-control = cc` (the Client
    sends the downloads) and wait until the tunnel serves again."""
    if client:
        client.kill()
    client = w.start_client(w.client, server, override={"client": {"congestion-control": cc}})
    client.wait_for_log(f"congestion_control={cc}", timeout=20)
    w.visitor.wait_until_succeeds(curl(w, "https://app.example.com/ | grep -qx backend-1"),
                                  timeout=30)
    return client


def fairness(w, seconds, a_url, a_resolve, b_url, b_resolve):
    """Two downloads at once over the same bottleneck; their Mbit/s."""
    cmd = " & ".join(
        f"curl -s --cacert {w.pki}/ca.crt {res} --max-time {seconds} -o /dev/null "
        f"-w '{tag} %{{size_download}} %{{time_total}}\n' {url}"
        for tag, url, res in (("A", a_url, a_resolve), ("B", b_url, b_resolve))) + " & wait"
    out = w.visitor.execute(cmd, timeout=seconds + 60)[1]
    got = {}
    for line in out.splitlines():
        tag, size, total = line.split()
        got[tag] = int(size) * 8 / 1e6 / max(1e-6, float(total))
    return got.get("A", 0.0), got.get("B", 0.0)


def bench(w, seconds, profiles=None, fair_seconds=30):
    server = w.start_server()
    client = None
    direct = "--resolve app.example.com:8443:%s https://app.example.com:8443" % ADDR["backend"]
    d_res, d_url = " ".join(direct.split()[:2]), direct.split()[-1]
    c_res = f"--resolve app.example.com:9443:{ADDR['backend']}"
    c_url = "https://app.example.com:9443"
    big = "/bytes/%d" % (64 << 30)
    rows = []
    cc = w.backend.succeed("sysctl -n net.ipv4.tcp_congestion_control").strip()
    for i, name in enumerate(profiles or PROFILES):
        w.net.set_profile(name)
        idle = idle_connect(w)
        d_bps, _, d_q = measure(w, d_url + big, seconds, resolve=d_res, probe=True)
        # The same with Cubic on the sending side of the direct path.
        dc_bps, _, dc_q = measure(w, c_url + big, seconds, resolve=c_res, probe=True)
        row = dict(profile=name, direct_mbit=d_bps * 8 / 1e6, dcubic_mbit=dc_bps * 8 / 1e6,
                   direct_q=((d_q or idle) - idle) * 1000, dcubic_q=((dc_q or idle) - idle) * 1000)
        # Both tunnel controllers in the same run, order alternating per
        # profile so that drift on a shared machine does not favour one.
        for ctl in (CONTROLLERS if i % 2 == 0 else CONTROLLERS[::-1]):
            client = client_with(w, server, client, ctl)
            s0, c0 = server.cpu_seconds(), client.cpu_seconds()
            t_bps, t_bytes, t_q = measure(w, "https://app.example.com" + big, seconds, probe=True)
            s1, c1 = server.cpu_seconds(), client.cpu_seconds()
            lost, cwnd = path_stats(w, client)
            row.update({f"t{ctl}_lost": lost, f"t{ctl}_cwnd": cwnd})
            gib = max(t_bytes, 1) / (1 << 30)
            row.update({f"t{ctl}_mbit": t_bps * 8 / 1e6, f"t{ctl}_ratio": t_bps / max(d_bps, 1e-9),
                        f"t{ctl}_q": ((t_q or idle) - idle) * 1000,
                        f"t{ctl}_scpu": (s1 - s0) / gib, f"t{ctl}_ccpu": (c1 - c0) / gib})
        d_lat = latency(w, d_url + "/", 5, resolve=d_res)
        t_lat = latency(w, "https://app.example.com/", 5)
        row.update(direct_ms=d_lat * 1000, tunnel_ms=t_lat * 1000)
        rows.append(row)
        log("  %(profile)-14s direct %(direct_mbit)7.1f  direct-cubic %(dcubic_mbit)7.1f  "
            "tunnel-cubic %(tcubic_mbit)7.1f  tunnel-bbr %(tbbr_mbit)7.1f Mbit/s  "
            "bbr/direct %(tbbr_ratio)5.2f cubic/direct %(tcubic_ratio)5.2f | added queue ms direct "
            "%(direct_q).0f/%(dcubic_q).0f tunnel %(tcubic_q).0f/%(tbbr_q).0f | CPU s/GiB client "
            "cubic %(tcubic_ccpu).2f bbr %(tbbr_ccpu).2f | tunnel lost %% cubic %(tcubic_lost).2f "
            "bbr %(tbbr_lost).2f, window KiB cubic %(tcubic_cwnd).0f bbr %(tbbr_cwnd).0f" % row)
    fair = []
    if fair_seconds:
        w.net.set_profile("rate10m-deep")
        a, b = fairness(w, fair_seconds, d_url + big, d_res, c_url + big, c_res)
        fair.append(("direct TCP " + cc, a, b))
        for ctl in CONTROLLERS:
            client = client_with(w, server, client, ctl)
            a, b = fairness(w, fair_seconds, "https://app.example.com" + big, "", c_url + big, c_res)
            fair.append((f"tunnel {ctl}", a, b))
            log(f"  fairness {ctl}: tunnel {a:.1f} Mbit/s vs Cubic TCP {b:.1f} Mbit/s")
    w.net.set_profile("none")
    if client:
        client.kill()
    server.kill()
    mech = "tc netem" if w.net.netem else "userspace impair"
    print(f"\nBenchmark (WAN impairment: {mech}; single-stream HTTPS download, {seconds}s each; "
          f"direct TCP congestion control: {cc} (kernel default) and cubic; tunnel with "
          "congestion-control = cubic and bbr, interleaved; added queue = median TCP connect "
          "time across the bottleneck during the download minus idle; first byte = median time "
          "to first byte of a new HTTPS connection)")
    print(f"| profile | direct {cc} Mbit/s | direct cubic | tunnel cubic | tunnel bbr | tunnel cubic / direct {cc} "
          f"| tunnel bbr / direct {cc} | added queue ms: direct {cc} / direct cubic / tunnel cubic / tunnel bbr "
          "| Client CPU s/GiB cubic / bbr | Server CPU s/GiB cubic / bbr | first byte ms direct / tunnel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['direct_mbit']:.1f} | {r['dcubic_mbit']:.1f} | {r['tcubic_mbit']:.1f} | "
              f"{r['tbbr_mbit']:.1f} | {r['tcubic_ratio']:.2f} | {r['tbbr_ratio']:.2f} | "
              f"{r['direct_q']:.0f} / {r['dcubic_q']:.0f} / {r['tcubic_q']:.0f} / {r['tbbr_q']:.0f} | "
              f"{r['tcubic_ccpu']:.2f} / {r['tbbr_ccpu']:.2f} | "
              f"{r['tcubic_scpu']:.2f} / {r['tbbr_scpu']:.2f} | "
              f"{r['direct_ms']:.1f} / {r['tunnel_ms']:.1f} |")
    for r in rows:
        if r["profile"] not in ("none", "rate10m"):
            print(f"target (tunnel >= 0.8 x direct {cc}) under {r['profile']}: bbr {r['tbbr_ratio']:.2f} "
                  f"{'meets' if r['tbbr_ratio'] >= 0.8 else 'MISSES'}, cubic {r['tcubic_ratio']:.2f}")
    if fair:
        print(f"\nFairness (rate10m-deep, {fair_seconds}s, against a Cubic TCP download on the same bottleneck):")
        print("| flow | its Mbit/s | Cubic TCP Mbit/s | its share |")
        print("|---|---|---|---|")
        for label, a, b in fair:
            print(f"| {label} | {a:.1f} | {b:.1f} | {a / max(1e-9, a + b):.2f} |")
    return rows
