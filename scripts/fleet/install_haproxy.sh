#!/bin/sh
# Installs HAProxy for the fleet's proxy and its tests under DEST (default .tools), without root: Debian's own
# package and the shared libraries it needs that this system lacks are fetched with `apt-get download` and
# unpacked with `dpkg -x`; DEST/bin/haproxy runs it with those libraries. Idempotent: nothing is fetched when
# DEST/bin/haproxy already runs. A haproxy already on PATH is linked instead.
#
#   sh scripts/fleet/install_haproxy.sh [DEST]        (`make deps` runs it)
set -eu
DEST=${1:-.tools}
mkdir -p "$DEST/bin"
DEST=$(cd "$DEST" && pwd)
BIN="$DEST/bin/haproxy"
if [ -x "$BIN" ] && "$BIN" -v >/dev/null 2>&1; then
    exit 0
fi
if command -v haproxy >/dev/null 2>&1; then
    ln -sf "$(command -v haproxy)" "$BIN"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "install_haproxy: no apt-get/dpkg here (not Debian or Ubuntu); install HAProxy >= 2.4 yourself and put" \
         "it on PATH" >&2
    exit 1
fi
WORK="$DEST/haproxy-debs"
ROOT="$DEST/haproxy-root"
rm -rf "$WORK" "$ROOT"
mkdir -p "$WORK" "$ROOT"
cd "$WORK"
# apt-get as any user: the system's package lists when they are there, else a private copy fetched now
APT="apt-get -q -o Debug::NoLocking=1 -o APT::Sandbox::User=$(id -un)"
if ! $APT download haproxy >/dev/null 2>&1; then
    mkdir -p "$WORK/state/lists/partial" "$WORK/cache/archives/partial"
    APT="$APT -o Dir::State=$WORK/state -o Dir::State::status=/var/lib/dpkg/status -o Dir::Cache=$WORK/cache"
    $APT update >/dev/null
    $APT download haproxy >/dev/null
fi
# the libraries haproxy depends on (recursively) that dpkg does not list as installed here
DEPS=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
       --no-enhances --no-pre-depends haproxy 2>/dev/null | sed -n 's/^ *Depends: \([a-z0-9][^ <>]*\)$/\1/p' | sort -u)
if [ -d "$WORK/state" ]; then
    DEPS=$(apt-cache -o Dir::State="$WORK/state" -o Dir::State::status=/var/lib/dpkg/status -o Dir::Cache="$WORK/cache" \
           depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
           --no-pre-depends haproxy | sed -n 's/^ *Depends: \([a-z0-9][^ <>]*\)$/\1/p' | sort -u)
fi
for pkg in $DEPS; do
    case "$pkg" in lib*) ;; *) continue ;; esac
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        continue
    fi
    $APT download "$pkg" >/dev/null
done
for deb in ./*.deb; do
    dpkg -x "$deb" "$ROOT"
done
LIBS="$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/usr/lib/aarch64-linux-gnu:$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib"
cat > "$BIN" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$ROOT/usr/sbin/haproxy" "\$@"
WRAP
chmod +x "$BIN"
cd "$DEST"
rm -rf "$WORK"
"$BIN" -v | head -1
