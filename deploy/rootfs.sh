#!/bin/sh
# Lays out what the `scratch` image holds, in a folder: the binary, the glibc
# loader and the libraries the binary links (Bun's compiled binaries link
# glibc, oven-sh/bun#4836), /etc/passwd and /etc/group for uid 65532, and a
# CA bundle. The Dockerfile and `make image-check` both use it, so the image
# and the check hold exactly the same files.
# Usage: rootfs.sh <binary> <root>
set -eu
binary=$1
root=$2

mkdir -p "$root/etc/ssl/certs"
cp "$binary" "$root/auth-proxy"
chmod 0555 "$root/auth-proxy"
for library in $(ldd "$binary" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$library")"
  cp -L "$library" "$root$library"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
# Bun carries its own root CAs; the bundle serves tools and SSL_CERT_FILE users.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# Mount points a container runtime fills in.
mkdir -p "$root/proc" "$root/dev"
