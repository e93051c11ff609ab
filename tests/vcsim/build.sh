#!/bin/sh
# Build comb's vcsim (govmomi's vSphere simulator + our CBT extension) into OUTDIR/vcsim.
#
# Offline, from Debian's golang-go and golang-github-vmware-govmomi-dev (GOPATH mode).
# /usr/share/gocode is never modified: patched copies of a few simulator files and
# cbt_ext.go are handed to the compiler with `go build -overlay`.
set -eu

die() { echo "vcsim build: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: build.sh OUTDIR"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)/vcsim
gopath=/usr/share/gocode
sim=$gopath/src/github.com/vmware/govmomi/simulator

command -v go >/dev/null 2>&1 || die "go not found (apt-get install golang-go)"
[ -f "$sim/simulator.go" ] || die "govmomi source not found in $sim (apt-get install golang-github-vmware-govmomi-dev)"

# Up to date: the binary is newer than every input.
if [ -x "$out" ] && [ -z "$(find "$here" "$sim" -newer "$out" -type f -print | head -n 1)" ]; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# patch FILE OLD NEW: copy FILE (once) into $work and replace the single line containing OLD.
patch_copy() {
    src=$sim/$1
    dst=$work/$1
    [ -f "$dst" ] || cp "$src" "$dst"
    n=$(grep -cF -- "$2" "$dst" || true)
    [ "$n" = 1 ] || die "$1: expected one line with '$2', found $n (govmomi changed?)"
    OLD=$2 NEW=$3 perl -pi -e 's/\Q$ENV{OLD}\E/$ENV{NEW}/' "$dst"
}

# 1. Snapshot tasks name the VM as their entity (pyvmomi's WaitForTask wants a ManagedEntity).
patch_copy snapshot.go 'CreateTask(v, "removeSnapshot"' 'CreateTask(v.Vm, "removeSnapshot"'
patch_copy snapshot.go 'CreateTask(v, "revertToSnapshot"' 'CreateTask(v.Vm, "revertToSnapshot"'
# 2. Fetch of an unset property (vm.snapshot without snapshots) answers "unset" instead of panicking.
patch_copy property_collector.go 'if len(obj.PropSet) == 0 {' \
    'if len(obj.PropSet) == 0 && len(obj.MissingSet) == 0 { body.Res = &internal.FetchResponse{}; return body }; if len(obj.PropSet) == 0 {'
# 3. Failed tasks carry a readable localizedMessage (cbt_ext.go: faultMessage).
patch_copy task.go 'LocalizedMessage: fmt.Sprintf("%T", err),' 'LocalizedMessage: faultMessage(err),'
# 4. Hooks: the originals are renamed; cbt_ext.go wraps them under the original names.
patch_copy simulator.go 'func (s *Service) ServeDatastore(' 'func (s *Service) serveDatastore('
patch_copy virtual_machine.go 'func (vm *VirtualMachine) configure(' 'func (vm *VirtualMachine) configureOrig('
patch_copy virtual_machine.go 'func (vm *VirtualMachine) configureDevices(' 'func (vm *VirtualMachine) configureDevicesOrig('
patch_copy virtual_machine.go 'func (vm *VirtualMachine) CreateSnapshotTask(' 'func (vm *VirtualMachine) createSnapshotTask('

{
    printf '{"Replace": {\n'
    for f in "$work"/*.go; do
        printf '  "%s": "%s",\n' "$sim/$(basename "$f")" "$f"
    done
    printf '  "%s": "%s"\n}}\n' "$sim/comb_cbt_ext.go" "$here/cbt_ext.go"
} >"$work/overlay.json"

cd "$here"
GO111MODULE=off GOPATH=$gopath GOFLAGS= go build -overlay "$work/overlay.json" -o "$out.tmp" main.go
mv "$out.tmp" "$out"
