# Test-only PKI, generated at build time: a CA ("Runewarp VM test CA") that
# signs the TLS backend's certificate (app.example.com) and Pebble's HTTPS
# certificate (acme.test). Nothing here is secret.
{ pkgs }:
pkgs.runCommand "runewarp-vm-test-pki" { nativeBuildInputs = [ pkgs.openssl ]; } ''
  mkdir -p "$out"
  cd "$out"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 3650 -subj "/CN=Runewarp VM test CA" -keyout ca.key -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  leaf() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=$1" -keyout "$1.key" -out "$1.csr"
    printf '%s\n' "subjectAltName=DNS:$1" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
      -days 3650 -extfile "$1.ext" -out "$1.crt"
    rm "$1.csr" "$1.ext"
  }
  leaf app.example.com
  leaf acme.test
  chmod 0444 ./*
''
