"""Hosts, processes and the network of the namespace driver: each host a
network namespace, processes inside them with their output in log files,
and the "wan" hop between the halves with its impairment profiles."""

import os
import shutil
import signal
import subprocess
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CONFIGS = os.path.join(REPO, "vm-tests", "configs")
IDENTITY = os.path.join(REPO, "vm-tests", "material", "client-identity")
PREFIX = f"rwh{os.getpid()}-"

ADDR = {
    "server": "10.231.0.1",
    "visitor": "10.231.0.2",
    "acme": "10.231.0.3",
    "client": "10.231.1.1",
    "client2": "10.231.1.2",
    "backend": "10.231.1.3",
}
# The Clients' addresses toward the Server side (their "WAN" addresses);
# the migration fault moves client from .2.1 to .2.2.
CLIENT_WAN = {"client": "10.231.2.1", "client2": "10.231.2.5"}
INET_HOSTS = ["visitor", "server", "acme"]
SITE_HOSTS = ["client", "client2", "backend"]

PROFILES = {
    # name: (one-way delay ms, loss per direction, rate bit/s[, extras]);
    # extras: "limit" (packets queued per direction, default 1000),
    # "jitter" (ms, uniform around the delay, no reordering), "delay2" and
    # "period" (ms: the one-way delay switches between delay and delay2
    # every period, so every download sees its RTT change mid-transfer).
    "none": (0, 0.0, 0),
    "rtt50": (25, 0.0, 0),
    "loss1": (0, 0.01, 0),
    "rate10m": (0, 0.0, 10_000_000),
    "rtt50+loss1": (25, 0.01, 0),
    # Intercontinental: 100 ms RTT, 0.5 % loss.
    "rtt100+loss0.5": (50, 0.005, 0),
    # Wi-Fi-like: 30 ms RTT, 2 % loss, +-5 ms jitter each way.
    "wifi": (15, 0.02, 0, {"jitter": 5}),
    # A 10 Mbit/s bottleneck (40 ms RTT) with a deep buffer: 4,000
    # packets, ~4.8 s of queue at full-size frames.
    "rate10m-deep": (20, 0.0, 10_000_000, {"limit": 4000}),
    # RTT alternating 20 ms / 80 ms every 2 s.
    "rtt-change": (10, 0.0, 0, {"delay2": 40, "period": 2000}),
}


def log(msg):
    print(f"[netns {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


class Failure(Exception):
    pass


# --- processes -----------------------------------------------------------

LOG_SEQ = iter(range(1, 1000000))


class Proc:
    """A process inside a host's namespace; output to a log file."""

    def __init__(self, host, name, argv, env=None):
        self.host, self.name = host, name
        self.log = os.path.join(host.net.work, f"{next(LOG_SEQ):03d}-{host.name}-{name}.log")
        out = open(self.log, "ab")
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        full_env.update(env or {})
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", host.ns] + argv,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=full_env, start_new_session=True)
        out.close()
        host.net.procs.append(self)

    @property
    def pid(self):
        return self.p.pid

    def text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def running(self):
        return self.p.poll() is None

    def send_signal(self, sig):
        if self.running():
            os.kill(self.p.pid, sig)

    def stop(self, sig=signal.SIGTERM, within=20):
        """Send `sig`; return (exit code, seconds) once it exits."""
        start = time.monotonic()
        self.send_signal(sig)
        try:
            code = self.p.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise Failure(f"{self.host.name}/{self.name} did not exit within {within}s")
        return code, time.monotonic() - start

    def stop_cleanly(self, bound):
        """As the VM driver's (vm-tests/scenarios/vm.py): SIGTERM, exits 0
        by itself within `bound` seconds; returns the seconds."""
        code, took = self.stop(signal.SIGTERM, within=bound + 5)
        if took >= bound:
            raise Failure(f"{self.name}: stop took {took:.1f}s (bound {bound}s)")
        if code != 0:
            raise Failure(f"{self.name}: exit status {code}")
        return took

    def log_text(self):
        return self.text()

    def reload(self):
        """SIGHUP: re-read the config file (systemctl reload's ExecReload)."""
        self.send_signal(signal.SIGHUP)

    def assert_running(self):
        assert self.running(), f"{self.host.name}/{self.name} is not running:\n{tail(self.text())}"

    def kill(self):
        if self.running():
            self.p.kill()
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def cpu_seconds(self):
        """utime + stime from /proc/<pid>/stat."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def count(self, needle):
        return sum(1 for l in self.text().splitlines() if needle in l)

    def wait_for_log(self, needle, timeout=60, after=0):
        """Wait for `needle` in the log (from occurrence `after` on)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count(needle) > after:
                return
            if not self.running():
                raise Failure(f"{self.host.name}/{self.name} exited waiting for {needle!r}:\n{tail(self.text())}")
            if time.monotonic() > deadline:
                raise Failure(f"no {needle!r} in {self.host.name}/{self.name} within {timeout}s:\n{tail(self.text())}")
            time.sleep(0.1)


def tail(text, n=25):
    return "\n".join(text.splitlines()[-n:])


# --- hosts and the network -----------------------------------------------

class Host:
    """One host: a network namespace. The methods mirror the NixOS test
    driver's Machine (succeed, fail, wait_until_succeeds, ...)."""

    def __init__(self, net, name):
        self.net, self.name, self.ns = net, name, PREFIX + name

    def execute(self, cmd, timeout=60):
        r = subprocess.run(["ip", "netns", "exec", self.ns, "sh", "-c", cmd],
                           capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def succeed(self, cmd, timeout=60):
        code, out, err = self.execute(cmd, timeout)
        if code != 0:
            raise Failure(f"{self.name}: `{cmd}` failed ({code}): {out}{err}")
        return out

    def fail(self, cmd, timeout=60):
        code, out, err = self.execute(cmd, timeout)
        if code == 0:
            raise Failure(f"{self.name}: `{cmd}` unexpectedly succeeded: {out}")
        return out + err

    def wait_until_succeeds(self, cmd, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            code, out, err = self.execute(cmd, timeout=max(5, timeout))
            if code == 0:
                return out
            if time.monotonic() > deadline:
                raise Failure(f"{self.name}: `{cmd}` did not succeed within {timeout}s: {out}{err}")
            time.sleep(0.25)

    def spawn(self, name, argv, env=None):
        return Proc(self, name, argv, env)

    def ip(self, *args):
        return run(["ip", "-n", self.ns] + list(args))


class Net:
    def __init__(self, work, impair_bin):
        self.work = work
        self.impair_bin = impair_bin
        self.procs = []
        self.namespaces = []
        self.hosts = {n: Host(self, n) for n in INET_HOSTS + SITE_HOSTS}
        self.wan_mode = None
        self.wan_proc = None
        self.switcher = None
        self.profile = None

    def ns(self, name):
        return PREFIX + name

    def add_ns(self, name):
        ns = self.ns(name)
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        etc = f"/etc/netns/{ns}"
        os.makedirs(etc, exist_ok=True)
        with open(f"{etc}/hosts", "w") as f:
            # As vm-tests/common.nix's networking.extraHosts.
            f.write("127.0.0.1 localhost\n"
                    f"{ADDR['server']} tunnel.example.com app.example.com other.example.com\n"
                    f"{ADDR['acme']} acme.test\n"
                    f"{ADDR['backend']} backend\n")
        for cmd in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                    ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]):
            run(["ip", "netns", "exec", ns] + cmd, check=False)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def veth(self, a, a_if, b, b_if):
        run(["ip", "link", "add", "name", a_if, "netns", self.ns(a), "type", "veth",
             "peer", "name", b_if, "netns", self.ns(b)])
        for ns, ifname in ((a, a_if), (b, b_if)):
            # One wire packet per frame, so loss and rate apply per packet.
            run(["ip", "-n", self.ns(ns), "link", "set", ifname, "gso_max_segs", "1", "up"])

    def bridge(self, ns, ports):
        run(["ip", "-n", self.ns(ns), "link", "add", "br0", "type", "bridge",
             "forward_delay", "0"])
        for p in ports:
            run(["ip", "-n", self.ns(ns), "link", "set", p, "master", "br0"])
        run(["ip", "-n", self.ns(ns), "link", "set", "br0", "up"])

    def up(self):
        for name in ["inet", "site", "wan"] + INET_HOSTS + SITE_HOSTS:
            self.add_ns(name)
        for h in INET_HOSTS:
            self.veth(h, "eth0", "inet", h)
        for h in SITE_HOSTS:
            self.veth(h, "eth0", "site", h)
        self.veth("wan", "to-site", "site", "wan")
        self.veth("wan", "to-inet", "inet", "wan")
        self.bridge("inet", INET_HOSTS + ["wan"])
        self.bridge("site", SITE_HOSTS + ["wan"])
        for h, addr in ADDR.items():
            self.hosts[h].ip("addr", "add", f"{addr}/16", "dev", "eth0")
        for h, wan in CLIENT_WAN.items():
            self.hosts[h].ip("addr", "add", f"{wan}/32", "dev", "eth0")
            self.client_routes(h, wan)
        self.netem = self.detect_netem()
        log(f"WAN impairment mechanism: {'kernel tc netem' if self.netem else 'userspace examples/impair (no sch_netem in this kernel)'}")
        self.set_profile("none")

    def client_routes(self, h, wan):
        # Toward the Server side the Client speaks from its WAN address;
        # toward the backend from its LAN address.
        self.hosts[h].ip("route", "replace", "10.231.0.0/24", "dev", "eth0", "src", wan)

    def detect_netem(self):
        r = run(["tc", "-n", self.ns("wan"), "qdisc", "add", "dev", "to-site", "root",
                 "netem", "delay", "1ms"], check=False)
        if r.returncode == 0:
            run(["tc", "-n", self.ns("wan"), "qdisc", "del", "dev", "to-site", "root"], check=False)
            return True
        log(f"tc netem unavailable: {r.stderr.strip()}")
        return False

    def set_profile(self, name):
        """Make the wan hop apply profile `name` (both directions)."""
        delay, loss, rate, *rest = PROFILES[name]
        extra = rest[0] if rest else {}
        limit = extra.get("limit", 1000)
        jitter = extra.get("jitter", 0)
        wan = self.ns("wan")
        if self.switcher:
            self.switcher[0].set()
            self.switcher[1].join()
            self.switcher = None
        if self.wan_proc:
            self.wan_proc.kill()
            self.wan_proc = None
        run(["ip", "-n", wan, "link", "del", "br0"], check=False)
        for dev in ("to-site", "to-inet"):
            run(["tc", "-n", wan, "qdisc", "del", "dev", dev, "root"], check=False)
        if name == "none" or self.netem:
            self.bridge("wan", ["to-site", "to-inet"])
            if name != "none":
                args = []
                if delay:
                    args += ["delay", f"{delay}ms"] + ([f"{jitter}ms"] if jitter else [])
                if loss:
                    args += ["loss", f"{loss * 100}%"]
                if rate:
                    args += ["rate", f"{rate}bit"]
                for dev in ("to-site", "to-inet"):
                    run(["tc", "-n", wan, "qdisc", "add", "dev", dev, "root", "netem",
                         "limit", str(limit)] + args)
                if extra.get("period"):
                    self.switcher = self.delay_switcher(
                        wan, args[2:], limit, delay, extra["delay2"], extra["period"])
        else:
            for dev in ("to-site", "to-inet"):
                run(["ip", "-n", wan, "link", "set", dev, "promisc", "on"])
            self.wan_proc = Proc(Host(self, "wan"), f"impair-{name}",
                                 [self.impair_bin, "to-site", "to-inet",
                                  "--delay-ms", str(delay), "--loss", str(loss),
                                  "--rate-bit", str(rate), "--limit", str(limit),
                                  "--jitter-ms", str(jitter),
                                  "--delay2-ms", str(extra.get("delay2", 0)),
                                  "--period-ms", str(extra.get("period", 0))])
            time.sleep(0.3)
            if not self.wan_proc.running():
                raise Failure(f"impair failed:\n{self.wan_proc.text()}")
        self.profile = name

    def delay_switcher(self, wan, args, limit, d1, d2, period_ms):
        """Under netem: switch the delay between d1 and d2 every period
        (`args`: the netem arguments after the delay)."""
        stop = threading.Event()

        def loop():
            n = 0
            while not stop.wait(period_ms / 1000):
                n += 1
                d = d2 if n % 2 else d1
                for dev in ("to-site", "to-inet"):
                    run(["tc", "-n", wan, "qdisc", "change", "dev", dev, "root", "netem",
                         "limit", str(limit), "delay", f"{d}ms"] + args, check=False)
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return stop, t

    def down(self):
        for p in reversed(self.procs):
            p.kill()
        # Anything else still inside our namespaces was started by us.
        for ns in self.namespaces:
            r = run(["ip", "netns", "pids", ns], check=False)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.namespaces = []
        try:
            os.rmdir("/etc/netns")  # only if empty: other users' entries stay
        except OSError:
            pass
        left = [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith(PREFIX)]
        if left:
            log(f"WARNING: namespaces left behind: {left}")
