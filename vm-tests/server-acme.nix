# Server ACME: the Server obtains the certificate for its own hostname
# (tunnel.example.com) from Pebble via TLS-ALPN-01 on its public listener.
# The Client trusts only Pebble's root, so connecting proves the Server
# presents the ACME certificate; Visitor traffic then flows as usual.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-server-acme";
  withAcme = true;
  nodes.server = common.server { config = ./configs/server-acme.toml; };
  scenario = ./scenarios/server_acme.py;
}
