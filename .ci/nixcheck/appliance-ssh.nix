# Added to nixosConfigurations.server-appliance by .ci/check_nix: an image
# built with an SSH key for root (the appliance's only login option).
{
  runewarp.appliance.sshAuthorizedKeys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7d0yIHy1lFbZUjxHG0U8gqoTShpqYUQgvDoypB3nQx ops@example.com"
  ];
}
