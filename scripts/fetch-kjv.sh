#!/usr/bin/env bash
# Prepares the King James Version of the Bible (1611; public domain: its
# copyright expired centuries ago — see the Debian package's copyright file)
# as plain UTF-8 text, one verse per line, for `dynsparse train --data`.
#
# Source: Debian's `bible-kjv-text` package (the compressed text) and
# `bible-kjv` (the `bible` program that decompresses it), fetched with
# `apt-get download` (no root install, nothing outside the package registry).
#
# Usage: scripts/fetch-kjv.sh OUT.txt
set -euo pipefail
out=${1:?usage: scripts/fetch-kjv.sh OUT.txt}
# sha256 of the prepared text (bible-kjv 4.38); a different package version
# may print a different text: the check says so instead of training on it silently.
want=b5c4940bcfeee072c0935b5200d0f9d88a00a0199cb0961d16133458fcdfae5d
tmp=$(mktemp -d)
chmod 755 "$tmp"  # apt-get download runs as _apt where it can
trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && apt-get download bible-kjv-text bible-kjv 2>&1 >/dev/null | grep -v unsandboxed >&2 || true )
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/x"; done
# -f: one verse per line with its reference ("Ge1:1 In the beginning ..."); drop the reference.
"$tmp/x/usr/bin/bible" -p "$tmp/x/usr/lib" -d bible.data -f 'gen1:1-rev22:21' | sed 's/^[^ ]* //' >"$out"
got=$(sha256sum "$out" | cut -d' ' -f1)
echo "$out: $(wc -c <"$out") bytes, $(wc -l <"$out") verses, sha256 $got"
if [ "$got" != "$want" ]; then
    echo "warning: sha256 differs from the one this script was written against ($want)" >&2
    exit 2
fi
