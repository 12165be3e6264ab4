#!/usr/bin/env bash
# `make docker-check`: the part of `make up` that can go wrong without a
# Docker engine. The image is built from the files the Dockerfile's build
# stage COPYs, and nothing else; a new file outside them (an include_str!, a
# module, a build input) would break `make up` while every other check
# passes. So every COPY source must exist, and the crate assembled from those
# sources alone must compile with the Dockerfile's cargo command, checked
# here with `cargo check` rather than a full release build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
fail() { echo "docker-check: $*" >&2; exit 1; }

# COPY lines of the build stage: the first FROM up to the next FROM.
sources=$(awk '
  /^FROM / { stage++ }
  stage == 1 && /^COPY / && !/--from=/ {
    if ($2 ~ /^\[/ || $2 ~ /^--/) { print "UNSUPPORTED " $0; next }
    for (i = 2; i < NF; i++) print $i
  }' Dockerfile)
[ -n "$sources" ] || fail "no COPY in the Dockerfile's build stage"
if grep -q '^UNSUPPORTED' <<<"$sources"; then
  fail "cannot read this COPY form: $(grep '^UNSUPPORTED' <<<"$sources" | head -n1)"
fi
for src in $sources; do
  [ -e "$src" ] || fail "the Dockerfile copies $src, which does not exist"
  git ls-files --error-unmatch "$src" >/dev/null 2>&1 ||
    fail "the Dockerfile copies $src, which git does not track"
  # Only tracked files, as a fresh clone would hold them.
  git ls-files -z -- "$src" | xargs -0 cp --parents -t "$STAGE"
done

build=$(sed -n 's/^RUN \(cargo build [^&\\]*\).*/\1/p' Dockerfile)
build=${build%"${build##*[![:space:]]}"}
[ -n "$build" ] || fail "no 'RUN cargo build' in the Dockerfile"
check=${build/cargo build/cargo check}
echo "docker-check: $check, on the $(wc -w <<<"$sources") COPY sources alone" >&2
(cd "$STAGE" && CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target} $check --quiet) ||
  fail "the image's build fails on the files the Dockerfile copies"
echo "docker-check: ok"
