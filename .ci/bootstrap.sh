# Sourced by test.sh and demo.sh: make sure Debian packages and the venv are there.
# Debian packages are installed with apt-get when running as root and something is missing.

comb_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
comb_venv="${COMB_VENV:-$comb_root/.venv}"

comb_apt_install() {
    # $@: Debian package names whose absence was detected
    if [ "$#" -eq 0 ]; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian packages: $*" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq "$@" >/dev/null
    else
        echo "missing Debian packages: $* (install them, e.g. sudo apt-get install $*)" >&2
        return 1
    fi
}

comb_python() {
    # The interpreter for a new venv: python3, unless it is older than 3.13 and a Python 3.13 or
    # later is on PATH or installed by pyenv (3.13 brought ssl's PSK callbacks: serve --tls-psk).
    local p candidates=(python3 python3.14 python3.13)
    if command -v pyenv >/dev/null; then
        for p in $(pyenv versions --bare 2>/dev/null | sort -r -V); do
            candidates+=("$(pyenv root)/versions/$p/bin/python3")
        done
    fi
    for p in "${candidates[@]}"; do
        if command -v "$p" >/dev/null \
            && "$p" -c 'import sys; sys.exit(not (3, 13) <= sys.version_info < (3, 15))' \
            2>/dev/null; then
            echo "$p"
            return
        fi
    done
    echo python3
}

comb_bootstrap() {
    # $1: pip extras to install ("" or "test")
    local extras="$1" missing=() python pkg=python3
    python="$(comb_python)"
    # (Debian names a versioned interpreter's venv and headers after it: python3.13-venv)
    case "$(basename "$python")" in python3.[0-9]*) pkg="$(basename "$python")" ;; esac
    command -v "$python" >/dev/null || missing+=(python3)
    "$python" -c 'import venv, ensurepip' 2>/dev/null || missing+=("$pkg-venv")
    command -v cmp >/dev/null || missing+=(diffutils)
    # The demo's file part makes an ext4 disk (mkfs.ext4 -d) and changes it (debugfs).
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    # ISA-L encodes parity ~10x faster than zfec (catalog/store/parity_codec.py; same bytes).
    /sbin/ldconfig -p 2>/dev/null | grep -q 'libisal\.so\.2' || missing+=(libisal2)
    if [ "$extras" = test ]; then
        # The tests drive real tools: script (a terminal for the progress bar), losetup
        # (loop devices as block-device sources and targets), git (golden files are tracked).
        command -v script >/dev/null || missing+=(bsdutils)
        command -v losetup >/dev/null || missing+=(mount)
        command -v git >/dev/null || missing+=(git)
        command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
        command -v chromium >/dev/null || missing+=(chromium)  # dashboard page, rendered headless
        command -v qemu-img >/dev/null || missing+=(qemu-utils)  # independent reader of exports
        command -v nbdinfo >/dev/null || missing+=(libnbd-bin)  # NBD clients: nbdinfo, nbdcopy
        # A source whose reads fail (nbdkit's error filter, seen as a file through nbdfuse).
        command -v nbdkit >/dev/null || missing+=(nbdkit)
        # vSphere tests: vcsim is built from Debian's govmomi source (tests/vcsim/build.sh).
        command -v go >/dev/null || missing+=(golang-go)
        [ -f /usr/share/gocode/src/github.com/vmware/govmomi/simulator/simulator.go ] \
            || missing+=(golang-github-vmware-govmomi-dev)
        # Real filesystems for the file-level tests (tests/fsimages.py): made with mkfs, filled
        # with cp/mcopy or through FUSE (the kernel here may lack vfat and exfat).
        command -v mkfs.vfat >/dev/null || missing+=(dosfstools)
        command -v mcopy >/dev/null || missing+=(mtools)
        command -v mkntfs >/dev/null || missing+=(ntfs-3g)
        command -v mkfs.xfs >/dev/null || missing+=(xfsprogs)
        command -v mkfs.exfat >/dev/null || missing+=(exfatprogs)
        command -v mount.exfat-fuse >/dev/null || missing+=(exfat-fuse)
        command -v mkfs.btrfs >/dev/null || missing+=(btrfs-progs)
        command -v sfdisk >/dev/null || missing+=(fdisk)
        command -v pvcreate >/dev/null || missing+=(lvm2)
        command -v cryptsetup >/dev/null || missing+=(cryptsetup-bin)  # a LUKS volume is named
        command -v zsh >/dev/null || missing+=(zsh)  # comb completion zsh is checked by zsh
        command -v setfacl >/dev/null || missing+=(acl)  # restore --xattrs: ACLs set and compared
        # pyfuse3 (comb mount) is built against libfuse3 when pip installs it.
        command -v gcc >/dev/null || missing+=(gcc)
        command -v pkg-config >/dev/null || missing+=(pkg-config)
        pkg-config --exists fuse3 2>/dev/null || missing+=(libfuse3-dev)
        "$python" -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
            2>/dev/null || missing+=("$pkg-dev")
    fi
    comb_apt_install "${missing[@]}"
    if [ ! -x "$comb_venv/bin/python" ]; then
        "$python" -m venv "$comb_venv"
    fi
    local spec="." stamp
    [ -n "$extras" ] && spec=".[$extras]"
    stamp="$comb_venv/.comb-installed-$(cat "$comb_root/pyproject.toml" | sha256sum | cut -c1-16)-${extras:-base}"
    if [ ! -f "$stamp" ]; then
        "$comb_venv/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$comb_venv/bin/python" -m pip install -q -e "$comb_root$( [ -n "$extras" ] && echo "[$extras]")"
        touch "$stamp"
    fi
}
