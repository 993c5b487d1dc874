# A small SMTP sink for the gate scenario (gate.py), started by both
# drivers: the VM test as its smtp-sink unit (vm-tests/gate.nix), the
# namespace driver as a process in the client namespace. Just enough SMTP
# for lettre: EHLO (advertising AUTH PLAIN), AUTH, MAIL, RCPT, DATA, QUIT.
# Every mail goes to OUT/NNN.eml (NNN counting from 000) with the AUTH
# credentials and recipients it came with as X-Auth / X-Rcpt lines.
# Loopback only. Standard library only.
#
#     python3 smtp_sink.py OUT [PORT]    (PORT: 2525)
import base64
import itertools
import os
import socketserver
import sys

OUT = sys.argv[1]
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 2525
counter = itertools.count()


class Session(socketserver.StreamRequestHandler):
    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self):
        auth, rcpts = "-", []
        self.reply("220 sink ESMTP")
        while True:
            line = self.rfile.readline().decode(errors="replace").strip()
            if not line:
                return
            verb = line.split(" ")[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250-sink")
                self.reply("250 AUTH PLAIN")
            elif verb == "AUTH":
                parts = base64.b64decode(line.split(" ")[2]).split(b"\0")
                auth = parts[1].decode() + ":" + parts[2].decode()
                self.reply("235 ok")
            elif verb == "RCPT":
                rcpts.append(line.split(":", 1)[1].strip(" <>"))
                self.reply("250 ok")
            elif verb == "DATA":
                self.reply("354 go on")
                body = []
                while True:
                    data = self.rfile.readline()
                    if data in (b".\r\n", b".\n", b""):
                        break
                    body.append(data.decode(errors="replace"))
                path = os.path.join(OUT, "%03d.eml" % next(counter))
                with open(path + ".tmp", "w") as f:
                    f.write("X-Auth: %s\nX-Rcpt: %s\n" % (auth, ",".join(rcpts)))
                    f.write("".join(body))
                os.rename(path + ".tmp", path)
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


os.makedirs(OUT, exist_ok=True)
socketserver.ThreadingTCPServer.allow_reuse_address = True
server = socketserver.ThreadingTCPServer(("127.0.0.1", PORT), Session)
print(f"smtp sink ready on 127.0.0.1:{PORT}", flush=True)
server.serve_forever()
