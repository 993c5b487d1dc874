# Terminate mode with Client ACME: the Client obtains a certificate for
# app.example.com from Pebble, the TLS-ALPN-01 challenge travelling
# Pebble -> Server (TCP 443) -> Tunnel -> Client; Visitors then get that
# certificate from the Client, and the backend speaks plain HTTP.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-terminate-client-acme";
  withAcme = true;
  nodes.client = common.client { config = ./configs/client-terminate-acme.toml; };
  scenario = ./scenarios/terminate_client_acme.py;
}
