# Runegate in both shapes, with the SMTP sink (smtp_sink.py) on the client
# host storing every mail and the AUTH credentials it was sent with:
# - on a terminate Service: the Visitor's TLS ends in the Client, whose gate
#   signs alice in by mailed link and then proxies to the plain HTTP
#   backend (the VM test: instance "test" from vm-tests/gate.nix, the SMTP
#   password through LoadCredential);
# - standalone (`runewarp gate`, the VM test's services.runewarp.gate) on
#   the client host in front of the same backend, signing bob in with the
#   mailed code; a reload that drops his address ends the session.
import re

APP = "https://app.example.com"
GATE = "http://localhost:7870"
SMTP = {
    "host": "127.0.0.1",
    "port": "2525",
    "tls": "none",
    "username": "signin@example.com",
}


def http(host, url, cookies, data=None):
    """One request without redirects: (status, headers text, body); Set-Cookie goes into cookies."""
    jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
    cmd = f"curl -sS -k -i --max-time 10 -H 'Cookie: {jar}' '{url}'"
    if data is not None:
        cmd += " --data '" + "&".join(f"{k}={v}" for k, v in data.items()) + "'"
    out = host.succeed(cmd)
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split("\n")[0].split(" ")[1])
    for m in re.finditer(r"(?im)^set-cookie: ([^=]+)=([^;]*)", head):
        cookies[m.group(1)] = m.group(2)
    return status, head, body


def field(body, name):
    return re.search(f'name="{name}" value="([^"]*)"', body).group(1)


def mail(host, mails, n):
    """Mail number `n` (from 0) in the sink's directory, quoted-printable soft breaks undone."""
    path = f"{mails}/{n:03d}.eml"
    host.wait_until_succeeds(f"test -e {path}", timeout=60)
    return host.succeed(f"cat {path}").replace("=\r\n", "").replace("=\n", "").replace("=3D", "=")


def ask(host, base, email, cookies):
    """Ask the gate at `base` for a sign-in mail to `email`; returns the waiting page."""
    status, _, body = http(host, f"{base}/private", cookies)
    assert status == 401, (status, body)
    data = {"email": email, "csrf": field(body, "csrf"), "next": "/private"}
    status, _, body = http(host, f"{base}/_runewarp/gate/sign-in", cookies, data)
    assert status == 200 and "Check your mail" in body, (status, body)
    return body


def scenario(t):
    server = t.start_server()
    mails = t.start_smtp_sink(t.client)

    with t.subtest("A gated terminate Service signs in by mailed link, then proxies"):
        smtp = dict(SMTP, **{
            "from": "Sign-in <signin@example.com>",
            "password-file": t.smtp_password_file("client"),
        })
        client = t.start_client(t.client, override={"client": {
            "services": [{
                "public-hostnames": ["app.example.com"],
                "backend-address": "backend:8080",
                "tls-mode": "terminate",
                "gate": {"allowed-emails": ["alice@example.com"]},
            }],
            "smtp": smtp,
        }})
        server.wait_for_log("tunnel_connected")
        client.wait_for_log("gate_ready")
        t.visitor.wait_until_succeeds(f"curl -sk -o /dev/null -w '%{{http_code}}' {APP}/ | grep -q 401")
        cookies = {}
        ask(t.visitor, APP, "alice@example.com", cookies)
        text = mail(t.client, mails, 0)
        assert "X-Auth: signin@example.com:sink-secret" in text, text
        assert "X-Rcpt: alice@example.com" in text, text
        token = re.search(r"token=([A-Za-z0-9_-]{43})", text).group(1)
        status, _, body = http(t.visitor, f"{APP}/_runewarp/gate/link?token={token}", cookies)
        assert status == 200 and "Press the button" in body, body
        status, head, _ = http(
            t.visitor, f"{APP}/_runewarp/gate/link", cookies, {"token": token, "csrf": field(body, "csrf")}
        )
        assert status == 303 and "location: /private" in head.lower(), head
        status, _, body = http(t.visitor, f"{APP}/", cookies)
        assert status == 200 and body.strip() == "plain-http-backend", (status, body)
        # Without the cookie: the sign-in page again.
        status, _, _ = http(t.visitor, f"{APP}/", {})
        assert status == 401, status

    with t.subtest("The standalone gate signs in by code and revokes on reload"):
        t.write_file(t.client, t.gate_config, "\n".join([
            "[gate]",
            'upstream = "http://backend:8080"',
            'base-url = "http://localhost:7870"',
            'allowed-emails = ["bob@example.com"]',
            f'state-dir = "{t.gate_state_dir}"',
            "[gate.smtp]",
        ] + [f'{k} = "{v}"' for k, v in SMTP.items()] + [
            f'password-file = "{t.smtp_password_file("gate")}"',
            'from = "signin@example.com"',
        ]) + "\n")
        gate = t.start_gate(t.client)
        t.client.wait_until_succeeds("bash -c 'exec 3<>/dev/tcp/127.0.0.1/7870'", timeout=30)
        cookies = {}
        page = ask(t.client, GATE, "bob@example.com", cookies)
        text = mail(t.client, mails, 1)
        assert "X-Rcpt: bob@example.com" in text, text
        code = re.search(r"waiting page: ([0-9]{6})", text).group(1)
        status, _, _ = http(t.client, f"{GATE}/_runewarp/gate/code", cookies, {"code": code, "csrf": field(page, "csrf")})
        assert status == 303, status
        status, _, body = http(t.client, f"{GATE}/private", cookies)
        assert status == 200 and body.strip() == "plain-http-backend", (status, body)
        # bob leaves the allow-list; a reload ends his session.
        t.client.succeed(f"sed -i 's/bob@example.com/carol@example.com/' {t.gate_config}")
        gate.reload()
        gate.wait_for_log("gate_reloaded")
        status, _, _ = http(t.client, f"{GATE}/private", cookies)
        assert status == 401, status

    if t.systemd:
        with t.subtest("Gate units are sandboxed"):
            props = t.client.succeed("systemctl show -p DynamicUser,ProtectSystem,Type runewarp-gate")
            for want in ["DynamicUser=yes", "ProtectSystem=strict", "Type=notify"]:
                assert want in props, props
