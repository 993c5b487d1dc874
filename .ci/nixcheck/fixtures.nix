# Values the nixcheck configs share (imported by them; not a config itself):
# one set of test hostnames, Client pin, private ACME directory and SMTP
# relay, so that every role's config describes the same deployment.
{
  # A Tunnel / Service with two Public hostnames.
  appHostnames = [
    "app.example.com"
    "www.example.com"
  ];

  # A Client identity pin (64 lowercase hex).
  pin = "6617b06d7075cd58f366bae3b69ba9e2e4ebc7e4b7f4561fd8f0a8c45701ed83";

  # `[<role>.acme]`: a private ACME directory whose CA comes in as the
  # `acme-ca.crt` credential of the unit with this credentials directory.
  acme = credentialsDirectory: {
    email = "ops@example.com";
    directory-url = "https://acme.internal.example:14000/dir";
    directory-ca-file = "${credentialsDirectory}/acme-ca.crt";
  };

  # `[<role>.smtp]`: the mail relay for Runegate's sign-in mails (the
  # password through `smtpPasswordFile`).
  smtp = {
    host = "smtp.example.com";
    username = "signin@example.com";
    from = "Sign-in <signin@example.com>";
  };
}
