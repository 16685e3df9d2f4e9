#!/usr/bin/env bash
# Make a local CA and a server certificate for a Flower SuperLink on this machine.
#
#   scripts/make_certs.sh OUTDIR [DAYS]
#
# Writes into OUTDIR (created if needed):
#   ca.crt       the CA certificate:  SuperNode --root-certificates, flwr config `root-certificates`,
#                                     SuperLink --ssl-ca-certfile
#   ca.key       the CA private key (keep it; only needed to sign more certificates)
#   server.pem   the SuperLink certificate, signed by the CA: SuperLink --ssl-certfile
#   server.key   its private key:                              SuperLink --ssl-keyfile
#
# The server certificate is valid for DNS:localhost, IP:127.0.0.1 and IP:::1
# (subjectAltName), for DAYS days (default 365). Set SAN_EXTRA, e.g.
# SAN_EXTRA="DNS:superlink.example.org,IP:10.0.0.5", to add the names and addresses
# SuperNodes on other machines use to reach the SuperLink.
# RSA key size: KEY_BITS (default 2048). Existing files in OUTDIR are overwritten. Needs openssl (>= 1.1.1).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    echo "usage: $0 OUTDIR [DAYS]" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }

OUT="$1"
DAYS="${2:-365}"
BITS="${KEY_BITS:-2048}"
SAN="DNS:localhost,IP:127.0.0.1,IP:::1${SAN_EXTRA:+,$SAN_EXTRA}"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# CA: self-signed, may sign certificates (basicConstraints CA:TRUE).
openssl genrsa -out "$OUT/ca.key" "$BITS" 2>/dev/null
openssl req -x509 -new -key "$OUT/ca.key" -sha256 -days "$DAYS" -subj "/CN=fedtune local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$OUT/ca.crt"

# Server key + CSR, then the CA signs it with the SAN extension.
openssl genrsa -out "$OUT/server.key" "$BITS" 2>/dev/null
openssl req -new -key "$OUT/server.key" -subj "/CN=localhost" -out "$TMP/server.csr"
cat > "$TMP/server.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EOF
openssl x509 -req -in "$TMP/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -CAserial "$TMP/ca.srl" -days "$DAYS" -sha256 -extfile "$TMP/server.ext" -out "$OUT/server.pem" 2>/dev/null

chmod 600 "$OUT/ca.key" "$OUT/server.key"
openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.pem" >/dev/null
echo "wrote $OUT/{ca.crt,ca.key,server.pem,server.key} (server SAN: $SAN)"
