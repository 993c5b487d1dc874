# `nixcheck check --flake .#control` config (run by .ci/test): a mesh control
# server on its default port, and a node on the same host enrolling with a
# setup key through LoadCredential and running the data plane (TUN device,
# CAP_NET_ADMIN) on a non-default port opened in the firewall, with a known
# public endpoint, as a Subnet Connector for an IPv4 and an IPv6 route.
{
  services.runewarp.control = {
    enable = true;
    openFirewall = true;
    databaseUrlFile = "/etc/runewarp/db-url";
    settings.control.hostname = "control.example.com";
  };
  services.runewarp.node = {
    enable = true;
    controlUrl = "https://control.example.com:7443";
    setupKeyFile = "/etc/runewarp/setup-key";
    caFile = "/etc/runewarp/control-ca.crt";
    hostname = "laptop one";
    listenPort = 41642;
    endpoints = [ "203.0.113.7:41642" ];
    advertiseRoutes = [ "10.0.5.0/24" "fd00:5::/64" ];
    openFirewall = true;
  };
}
