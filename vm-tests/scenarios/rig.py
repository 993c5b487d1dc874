# The interface the shared scenarios (vm-tests/scenarios/*.py) are written
# against. Each scenario file defines `scenario(t)`, where `t` is a Rig of
# one of the two drivers:
#
# - the NixOS VM test driver (vm.py, spliced into each VM test's testScript
#   by vm-tests/common.nix): Runewarp as systemd units on VMs;
# - the namespace driver (vm-tests/netns/harness/world.py, NetnsRig):
#   Runewarp as processes, each host a network namespace.
#
# Both give the hosts as `t.server`, `t.client`, `t.client2`, `t.backend`,
# `t.visitor` and `t.acme` (those a test has), with the test driver's
# primitives: succeed, fail, wait_until_succeeds. A Runewarp instance that
# `start_server` / `start_client` return offers wait_for_log(needle,
# timeout), log_text(), assert_running(), stop_cleanly(bound) -> seconds,
# `host` (where it runs), `state` (its state directory there) and, for a
# Client, `pin`; start_gate's also reload() (re-read its config file).
#
# The gate scenario (gate.py) adds: start_smtp_sink(host) (the mail sink,
# smtp_sink.py, on 127.0.0.1:2525 of `host`; returns the directory it
# stores mails in), smtp_password_file(role) (where the "client" or "gate"
# role reads the sink's password), gate_config and gate_state_dir (the
# standalone gate's config file and state directory on the client host),
# and start_gate(host) (the standalone gate from gate_config).
#
# Standard library only; no imports, so that the VM driver can take the
# file as it is.


def write_file(machine, path, text):
    """Write `text` to `path` on `machine` (creating its directory)."""
    machine.succeed(
        f"install -d -m 0755 $(dirname {path}) && cat > {path} <<'RUNEWARP_EOF'\n{text}RUNEWARP_EOF"
    )


class Rig:
    # Runewarp runs as systemd units (the VM driver): the journals hold the
    # units' ExecStartPre output, and unit properties can be inspected.
    systemd = False
    # Bound (seconds) on waits for an ACME certificate.
    acme_timeout = 120
    # The CA of the test PKI (vm-tests/pki.nix), trusted by Visitors.
    cacert = ""
    # The standalone gate's config file and state directory (gate.py).
    gate_config = ""
    gate_state_dir = ""

    def write_file(self, host, path, text):
        write_file(host, path, text)

    def curl(self, url, cacert=None):
        """A Visitor's curl command for `url` (plus any shell that follows),
        trusting `cacert` (default: the test CA)."""
        return f"curl -sS --fail --max-time 10 --cacert {cacert or self.cacert} {url}"

    def issuer(self, host):
        """The issuer of the certificate `host` gets for app.example.com."""
        return host.succeed(
            "openssl s_client -connect app.example.com:443 -servername app.example.com"
            " </dev/null 2>/dev/null | openssl x509 -noout -issuer"
        )
