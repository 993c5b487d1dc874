# Orderly shutdown: `systemctl stop` during a long Visitor transfer returns
# within a bound, the process exits 0 by itself (no SIGKILL, no timeout), and
# the transfer is cut rather than drained. For the Server, then the Client.
{
  pkgs,
  lib,
  common,
}:
common.test {
  name = "runewarp-shutdown";
  scenario = ./scenarios/shutdown.py;
}
