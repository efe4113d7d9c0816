#!/usr/bin/env bash
# A screenshot of the real viewer window, made headless: builds `ferrotron`, starts a virtual X
# server (Xvfb), opens `ferrotron view` on it (OpenGL rendered in software by Mesa's llvmpipe),
# waits until the window has drawn, captures it and stops everything it started.
#
#   bash scripts/screenshot.sh                  # GPT-2 small at tp = 4 → docs/gpt2-small-tp4.png
#   bash scripts/screenshot.sh OUT.png MODEL.ron [view arguments...]
#
# Installs what it lacks from Debian's packages (xvfb, x11-utils, imagemagick, libgl1-mesa-dri)
# when run as root; otherwise it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-docs/gpt2-small-tp4.png}
model=${2:-models/gpt2-small.ron}
if [ $# -gt 2 ]; then
    shift 2
    args=("$@")
else
    args=(--tp 4 --expand 0)
fi
size=1400x900

need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xwininfo >/dev/null || need+=(x11-utils)
{ command -v import >/dev/null && [ -x /usr/bin/convert ]; } || need+=(imagemagick)
ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1 || need+=(libgl1-mesa-dri)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "screenshot.sh: needs the Debian packages ${need[*]}: apt-get install ${need[*]}" >&2
        exit 1
    fi
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --bin ferrotron
bin=target/release/ferrotron

# A free display number.
display=99
while [ -e "/tmp/.X11-unix/X$display" ] || [ -e "/tmp/.X$display-lock" ]; do
    display=$((display + 1))
done
work=$(mktemp -d)
xvfb_pid=
view_pid=
cleanup() {
    [ -n "$view_pid" ] && kill "$view_pid" 2>/dev/null || true
    [ -n "$xvfb_pid" ] && kill "$xvfb_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

Xvfb ":$display" -screen 0 "${size}x24" -nolisten tcp >"$work/xvfb.log" 2>&1 &
xvfb_pid=$!
export DISPLAY=":$display"
for _ in $(seq 50); do
    xwininfo -root >/dev/null 2>&1 && break
    sleep 0.1
done
xwininfo -root >/dev/null 2>&1 || { cat "$work/xvfb.log" >&2; exit 1; }

# Mesa's software renderer, whatever GPU driver the machine may have.
LIBGL_ALWAYS_SOFTWARE=1 "$bin" view "$model" "${args[@]}" >"$work/view.log" 2>&1 &
view_pid=$!

# Wait for the window to be mapped.
window=
for _ in $(seq 300); do
    kill -0 "$view_pid" 2>/dev/null || { cat "$work/view.log" >&2; exit 1; }
    window=$(xwininfo -root -tree | awk '/"ferrotron: / && / [0-9]+x[0-9]+\+/ { print $1; exit }')
    [ -n "$window" ] && xwininfo -id "$window" | grep -q "IsViewable" && break
    window=
    sleep 0.1
done
[ -n "$window" ] || { echo "screenshot.sh: no viewer window appeared" >&2; cat "$work/view.log" >&2; exit 1; }

# Wait until it has drawn: two captures a moment apart, both with more than a handful of colours,
# identical (nothing is still being laid out or faded in).
previous=
for i in $(seq 40); do
    sleep 0.5
    import -window "$window" "$work/shot$i.png"
    colours=$(identify -format '%k' "$work/shot$i.png")
    if [ "$colours" -gt 16 ] && [ -n "$previous" ] &&
        compare -metric AE "$previous" "$work/shot$i.png" null: 2>/dev/null; then
        mkdir -p "$(dirname "$out")"
        # Whole or not at all: written beside the target, then renamed over it.
        convert "$work/shot$i.png" -strip "$out.tmp.png"
        mv -f "$out.tmp.png" "$out"
        echo "$out ($(identify -format '%wx%h' "$out"), $colours colours)"
        exit 0
    fi
    previous=$work/shot$i.png
done
echo "screenshot.sh: the window never settled" >&2
cat "$work/view.log" >&2
exit 1
