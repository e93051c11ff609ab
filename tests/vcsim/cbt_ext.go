// comb's extension to govmomi's vSphere simulator, compiled INTO package simulator by
// build.sh (go build -overlay). It adds what vcsim 0.24 lacks for backup tests:
//
//   - Changed Block Tracking: changeIds on snapshot disks and QueryChangedDiskAreas,
//     answered from fingerprints of the real bytes of each disk's -flat.vmdk;
//   - capability.changeTrackingSupported (hardware version >= vmx-07), CBT reset on toggle;
//   - disks sized to their capacity (sparse flat files);
//   - a session check on /folder (401 without a logged-in vmware_soap_session cookie);
//   - test-only fault hooks under /_comb/ (see README.md).
//
// build.sh renames the originals that are wrapped here: configure, configureDevices,
// CreateSnapshotTask and ServeDatastore.
package simulator

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"io"
	"net/http"
	"os"
	"path"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const cbtBlock = 64 << 10 // CBT granularity: one fingerprint per 64 KiB of disk

// cbtPrint fingerprints one block: a 64-bit seeded hash and a CRC-32C. The zero value
// means "all zero bytes" (a non-zero block always has the low bit of [1] set).
type cbtPrint [2]uint64

// cbtVM is the CBT state of one VM since change tracking was last switched on.
type cbtVM struct {
	epoch  string                          // changeIds are "<epoch>/<n>"
	seq    int                             // last n
	prints map[string]map[int32][]cbtPrint // changeId -> disk key -> block fingerprints
}

type folderFault struct {
	offset int64
	mode   string // "error" (HTTP 500) or "truncate" (body cut at offset)
	count  int    // requests left; 0 = until cleared
}

var cbt = struct {
	sync.Mutex
	pageBytes int64
	vms       map[types.ManagedObjectReference]*cbtVM
	lies      map[string][][2]int64 // "vm-N/diskKey" -> byte ranges left out of the answers
	lieWhich  map[string]string     // "all", "full" ("*" queries) or "incremental"
	failSnap  map[string]types.BaseMethodFault
	folder    map[string]*folderFault // datastore-relative path
	messages  map[types.BaseMethodFault]string
}{
	vms:      map[types.ManagedObjectReference]*cbtVM{},
	lies:     map[string][][2]int64{},
	lieWhich: map[string]string{},
	failSnap: map[string]types.BaseMethodFault{},
	folder:   map[string]*folderFault{},
	messages: map[types.BaseMethodFault]string{},
}

// CombSetup is called by the launcher before NewServer.
func CombSetup(s *Service, pageBytes int64) {
	cbt.pageBytes = pageBytes
	s.HandleFunc("/_comb/", combHooks)
}

// taskFault remembers msg as the localizedMessage of a task failing with f.
func taskFault(msg string, f types.BaseMethodFault) types.BaseMethodFault {
	cbt.Lock()
	defer cbt.Unlock()
	cbt.messages[f] = msg
	return f
}

// faultMessage is used by the patched Task.Run for task.info.error.localizedMessage.
func faultMessage(f types.BaseMethodFault) string {
	cbt.Lock()
	defer cbt.Unlock()
	if msg, ok := cbt.messages[f]; ok {
		return msg
	}
	return fmt.Sprintf("%T", f)
}

func hwVersion(v string) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(v, "vmx-"))
	return n
}

func cbtNotSupported(version string) types.BaseMethodFault {
	return taskFault(fmt.Sprintf("Changed Block Tracking is not supported by virtual hardware version %s (needs vmx-07 or later)", version), new(types.NotSupported))
}

// configure (ReconfigVM and VM defaults): refuse CBT on old hardware; toggling CBT resets it.
func (vm *VirtualMachine) configure(spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	if on := spec.ChangeTrackingEnabled; on != nil {
		version := vm.Config.Version
		if spec.Version != "" {
			version = spec.Version
		}
		if *on && hwVersion(version) < 7 {
			return cbtNotSupported(version)
		}
		if *on != isTrue(vm.Config.ChangeTrackingEnabled) {
			cbt.Lock()
			delete(cbt.vms, vm.Self) // every changeId issued so far becomes unknown
			cbt.Unlock()
			for _, disk := range vmDisks(vm.Config.Hardware.Device) {
				setChangeID(disk, "")
			}
		}
	}
	return vm.configureOrig(spec)
}

// configureDevices runs at the end of both CreateVM and ReconfigVM.
func (vm *VirtualMachine) configureDevices(spec *types.VirtualMachineConfigSpec) types.BaseMethodFault {
	if err := vm.configureDevicesOrig(spec); err != nil {
		return err
	}
	supported := hwVersion(vm.Config.Version) >= 7
	vm.Capability.ChangeTrackingSupported = &supported
	if isTrue(vm.Config.ChangeTrackingEnabled) && !supported {
		return cbtNotSupported(vm.Config.Version)
	}
	// A disk's flat file is a sparse file of the disk's capacity.
	for _, disk := range vmDisks(vm.Config.Hardware.Device) {
		if disk.CapacityInBytes == 0 {
			disk.CapacityInBytes = disk.CapacityInKB * 1024
		} else if disk.CapacityInKB == 0 {
			disk.CapacityInKB = (disk.CapacityInBytes + 1023) / 1024
		}
		if name, ok := vm.flatFile(disk); ok {
			if st, err := os.Stat(name); err == nil && st.Size() < disk.CapacityInBytes {
				_ = os.Truncate(name, disk.CapacityInBytes)
			}
		}
	}
	return nil
}

func vmDisks(devices []types.BaseVirtualDevice) []*types.VirtualDisk {
	var disks []*types.VirtualDisk
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok {
			disks = append(disks, disk)
		}
	}
	return disks
}

// changeIDField is the backing's ChangeId field (invalid for backings without one).
func changeIDField(disk *types.VirtualDisk) reflect.Value {
	if disk.Backing == nil {
		return reflect.Value{}
	}
	return reflect.ValueOf(disk.Backing).Elem().FieldByName("ChangeId")
}

func setChangeID(disk *types.VirtualDisk, id string) {
	if f := changeIDField(disk); f.IsValid() {
		f.SetString(id)
	}
}

func changeID(disk *types.VirtualDisk) string {
	if f := changeIDField(disk); f.IsValid() {
		return f.String()
	}
	return ""
}

// flatFile maps "[LocalDS_0] vm/vm.vmdk" to the local path of vm/vm-flat.vmdk.
func (vm *VirtualMachine) flatFile(disk *types.VirtualDisk) (string, bool) {
	b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
	if !ok || vm.Runtime.Host == nil {
		return "", false
	}
	p, fault := parseDatastorePath(b.GetVirtualDeviceFileBackingInfo().FileName)
	if fault != nil {
		return "", false
	}
	host, ok := Map.Get(*vm.Runtime.Host).(*HostSystem)
	if !ok {
		return "", false
	}
	ds, ok := Map.FindByName(p.Datastore, host.Datastore).(*Datastore)
	if !ok {
		return "", false
	}
	name := p.Path
	if !strings.HasSuffix(name, "-flat.vmdk") {
		name = vdmNames(name)[0]
	}
	return path.Join(ds.Info.GetDatastoreInfo().Url, name), true
}

var (
	cbtSeed  = maphash.MakeSeed()
	cbtCRC   = crc32.MakeTable(crc32.Castagnoli)
	cbtZeros = make([]byte, cbtBlock)
)

func blockPrint(b []byte) cbtPrint {
	if bytes.Equal(b, cbtZeros[:len(b)]) {
		return cbtPrint{}
	}
	return cbtPrint{maphash.Bytes(cbtSeed, b), uint64(crc32.Checksum(b, cbtCRC))<<1 | 1}
}

// dataRanges lists the byte ranges of f below size that may hold data (SEEK_DATA/SEEK_HOLE).
func dataRanges(f *os.File, size int64) [][2]int64 {
	const seekData, seekHole = 3, 4
	var ranges [][2]int64
	for off := int64(0); off < size; {
		start, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return [][2]int64{{off, size}} // no hole support: read everything
		}
		end, err := f.Seek(start, seekHole)
		if err != nil || end > size {
			end = size
		}
		if start < end {
			ranges = append(ranges, [2]int64{start, end})
		}
		off = end
	}
	return ranges
}

// fingerprint reads a disk of the given capacity from its flat file (bytes past the end of
// the file read as zeros) and fingerprints every block. Holes are not read.
func fingerprint(name string, capacity int64) ([]cbtPrint, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	prints := make([]cbtPrint, (capacity+cbtBlock-1)/cbtBlock)
	buf := make([]byte, 16*cbtBlock)
	for _, r := range dataRanges(f, st.Size()) {
		end := (r[1] + cbtBlock - 1) / cbtBlock * cbtBlock
		if end > capacity {
			end = capacity
		}
		for off := r[0] / cbtBlock * cbtBlock; off < end; {
			n := int64(len(buf))
			if off+n > end {
				n = end - off
			}
			m, err := f.ReadAt(buf[:n], off)
			if err != nil && err != io.EOF {
				return nil, err
			}
			copy(buf[m:n], cbtZeros) // n - m < one block only at the end of the file
			for b := int64(0); b < n; b += cbtBlock {
				e := b + cbtBlock
				if e > n {
					e = n
				}
				prints[(off+b)/cbtBlock] = blockPrint(buf[b:e])
			}
			off += n
		}
	}
	return prints, nil
}

// CreateSnapshotTask wraps the simulator's: an injected failure, own device copies for the
// snapshot and, with CBT on, a new changeId per disk with fingerprints of its bytes.
func (vm *VirtualMachine) CreateSnapshotTask(req *types.CreateSnapshot_Task) soap.HasFault {
	fail := func(f types.BaseMethodFault) soap.HasFault {
		task := CreateTask(vm, "createSnapshot", func(*Task) (types.AnyType, types.BaseMethodFault) { return nil, f })
		return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Run()}}
	}
	cbt.Lock()
	injected := cbt.failSnap[vm.Self.Value]
	delete(cbt.failSnap, vm.Self.Value)
	cbt.Unlock()
	if injected != nil {
		return fail(injected)
	}

	tracking := isTrue(vm.Config.ChangeTrackingEnabled)
	prints := map[int32][]cbtPrint{}
	if tracking {
		for _, disk := range vmDisks(vm.Config.Hardware.Device) {
			name, ok := vm.flatFile(disk)
			if !ok {
				continue
			}
			p, err := fingerprint(name, getDiskSize(disk))
			if err != nil {
				return fail(taskFault(fmt.Sprintf("cannot read disk %d for change tracking: %s", disk.Key, err), &types.FileFault{File: name}))
			}
			prints[disk.Key] = p
		}
	}

	body := vm.createSnapshotTask(req).(*methods.CreateSnapshot_TaskBody)
	task, ok := Map.Get(body.Res.Returnval).(*Task)
	if !ok {
		return body
	}
	ref, ok := task.Info.Result.(types.ManagedObjectReference)
	if !ok {
		return body
	}
	snap := Map.Get(ref).(*VirtualMachineSnapshot)
	var config types.VirtualMachineConfigInfo
	deepCopy(&snap.Config, &config) // the simulator's copy shares the VM's device objects
	snap.Config = config
	if !tracking {
		return body
	}

	cbt.Lock()
	state := cbt.vms[vm.Self]
	if state == nil {
		state = &cbtVM{epoch: uuid.New().String(), prints: map[string]map[int32][]cbtPrint{}}
		cbt.vms[vm.Self] = state
	}
	state.seq++
	id := fmt.Sprintf("%s/%d", state.epoch, state.seq)
	state.prints[id] = prints
	cbt.Unlock()
	for _, devices := range [][]types.BaseVirtualDevice{vm.Config.Hardware.Device, snap.Config.Hardware.Device} {
		for _, disk := range vmDisks(devices) {
			if _, ok := prints[disk.Key]; ok {
				setChangeID(disk, id)
			}
		}
	}
	return body
}

// QueryChangedDiskAreas answers from the fingerprints recorded at snapshot time.
func (vm *VirtualMachine) QueryChangedDiskAreas(req *types.QueryChangedDiskAreas) soap.HasFault {
	body := new(methods.QueryChangedDiskAreasBody)
	info, fault := vm.changedAreas(req)
	if fault != nil {
		body.Fault_ = fault
	} else {
		body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	}
	return body
}

func (vm *VirtualMachine) changedAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *soap.Fault) {
	invalid := func(prop, format string, args ...interface{}) *soap.Fault {
		return Fault(fmt.Sprintf(format, args...), &types.InvalidArgument{InvalidProperty: prop})
	}
	if req.Snapshot == nil {
		return nil, invalid("snapshot", "a snapshot is required")
	}
	snap, ok := Map.Get(*req.Snapshot).(*VirtualMachineSnapshot)
	if !ok || snap.Vm != vm.Self {
		return nil, invalid("snapshot", "%s is not a snapshot of %s", req.Snapshot.Value, vm.Self.Value)
	}
	disk, ok := object.VirtualDeviceList(snap.Config.Hardware.Device).FindByKey(req.DeviceKey).(*types.VirtualDisk)
	if !ok {
		return nil, invalid("deviceKey", "device %d is not a virtual disk", req.DeviceKey)
	}
	capacity := getDiskSize(disk)
	if req.StartOffset < 0 || req.StartOffset > capacity {
		return nil, invalid("startOffset", "startOffset %d is outside the disk (%d bytes)", req.StartOffset, capacity)
	}

	cbt.Lock()
	var cur, old []cbtPrint
	if state := cbt.vms[vm.Self]; state != nil {
		cur = state.prints[changeID(disk)][req.DeviceKey]
		if req.ChangeId != "*" {
			old = state.prints[req.ChangeId][req.DeviceKey]
		}
	}
	lieKey := fmt.Sprintf("%s/%d", vm.Self.Value, req.DeviceKey)
	lies := cbt.lies[lieKey]
	if w := cbt.lieWhich[lieKey]; w == "full" && req.ChangeId != "*" || w == "incremental" && req.ChangeId == "*" {
		lies = nil
	}
	pageBytes := cbt.pageBytes
	cbt.Unlock()
	if cur == nil {
		return nil, Fault(fmt.Sprintf("change tracking was not active for disk %d when snapshot %s was taken (or was reset since)", req.DeviceKey, snap.Self.Value),
			&types.FileFault{File: disk.Backing.(types.BaseVirtualDeviceFileBackingInfo).GetVirtualDeviceFileBackingInfo().FileName})
	}
	if req.ChangeId != "*" && old == nil {
		return nil, invalid("changeId", "unknown changeId %q for disk %d (never issued, or change tracking was reset)", req.ChangeId, req.DeviceKey)
	}

	end := capacity
	if pageBytes > 0 && req.StartOffset+pageBytes < end {
		end = req.StartOffset + pageBytes
	}
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: end - req.StartOffset}
	for b := req.StartOffset / cbtBlock; b*cbtBlock < end; b++ {
		var was cbtPrint
		if old != nil && b < int64(len(old)) {
			was = old[b]
		}
		if cur[b] == was || lied(lies, b*cbtBlock, (b+1)*cbtBlock) {
			continue
		}
		start, stop := max64(b*cbtBlock, req.StartOffset), min64((b+1)*cbtBlock, end)
		n := len(info.ChangedArea)
		if n > 0 && info.ChangedArea[n-1].Start+info.ChangedArea[n-1].Length == start {
			info.ChangedArea[n-1].Length += stop - start
		} else {
			info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: start, Length: stop - start})
		}
	}
	return info, nil
}

func lied(lies [][2]int64, start, end int64) bool {
	for _, r := range lies {
		if r[0] < end && start < r[0]+r[1] {
			return true
		}
	}
	return false
}

func min64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// ServeDatastore wraps the simulator's /folder handler with a session check and the
// injected read failures.
func (s *Service) ServeDatastore(w http.ResponseWriter, r *http.Request) {
	c, err := r.Cookie(soap.SessionCookieName)
	if err != nil {
		http.Error(w, "no vmware_soap_session cookie", http.StatusUnauthorized)
		return
	}
	if _, ok := s.sm.getSession(c.Value); !ok {
		http.Error(w, "not a logged-in session", http.StatusUnauthorized)
		return
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		start, end := requestRange(r)
		cbt.Lock()
		key := strings.TrimPrefix(r.URL.Path, folderPrefix)
		ff := cbt.folder[key]
		if ff != nil && end > ff.offset {
			if ff.count > 0 {
				if ff.count--; ff.count == 0 {
					delete(cbt.folder, key)
				}
			}
		} else {
			ff = nil
		}
		cbt.Unlock()
		if ff != nil && ff.mode == "error" {
			http.Error(w, "injected read error", http.StatusInternalServerError)
			return
		}
		if ff != nil {
			w = &cutWriter{ResponseWriter: w, left: max64(ff.offset-start, 0)}
		}
	}
	s.serveDatastore(w, r)
}

// requestRange returns [start, end) of the first range of a "Range: bytes=a-b" request.
func requestRange(r *http.Request) (int64, int64) {
	start, last := int64(0), int64(1)<<62
	_, _ = fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &start, &last)
	if start < 0 { // a suffix range ("bytes=-N")
		return 0, 1 << 62
	}
	return start, last + 1
}

// cutWriter ends a response body after `left` bytes (the client sees a short body).
type cutWriter struct {
	http.ResponseWriter
	left int64
}

func (c *cutWriter) Write(p []byte) (int, error) {
	if int64(len(p)) <= c.left {
		n, err := c.ResponseWriter.Write(p)
		c.left -= int64(n)
		return n, err
	}
	n, _ := c.ResponseWriter.Write(p[:c.left])
	c.left -= int64(n)
	return n, io.ErrShortWrite
}

// combHooks serves the test-only fault hooks (POST /_comb/<hook>?params); see README.md.
func combHooks(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	param := func(name, def string) string {
		if v := q.Get(name); v != "" {
			return v
		}
		return def
	}
	num := func(name string, def int64) int64 {
		v, err := strconv.ParseInt(q.Get(name), 10, 64)
		if err != nil {
			return def
		}
		return v
	}
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	hook := strings.TrimPrefix(r.URL.Path, "/_comb/")
	vm := q.Get("vm")
	if hook == "lie-cbt" || hook == "fail-snapshot" {
		if _, ok := Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: vm}).(*VirtualMachine); !ok {
			http.Error(w, fmt.Sprintf("no VM with moref %q", vm), http.StatusBadRequest)
			return
		}
	}
	cbt.Lock()
	defer cbt.Unlock()
	switch hook {
	case "lie-cbt":
		key := fmt.Sprintf("%s/%d", vm, num("disk", -1))
		start, length := num("start", -1), num("length", -1)
		which := param("which", "all")
		if start < 0 || length <= 0 || (which != "all" && which != "full" && which != "incremental") {
			http.Error(w, "lie-cbt needs vm, disk, start >= 0, length > 0, which=all|full|incremental", http.StatusBadRequest)
			return
		}
		cbt.lies[key] = append(cbt.lies[key], [2]int64{start, length})
		cbt.lieWhich[key] = which
	case "fail-snapshot":
		name := param("fault", "SnapshotFault")
		t, ok := types.TypeFunc()(name)
		var fault types.BaseMethodFault
		if ok {
			fault, ok = reflect.New(t).Interface().(types.BaseMethodFault)
		}
		if !ok {
			http.Error(w, fmt.Sprintf("%q is not a vSphere fault type", name), http.StatusBadRequest)
			return
		}
		cbt.messages[fault] = param("msg", "injected snapshot failure")
		cbt.failSnap[vm] = fault
	case "fail-folder":
		mode := param("mode", "error")
		offset := num("offset", 0)
		if q.Get("path") == "" || offset < 0 || (mode != "error" && mode != "truncate") {
			http.Error(w, "fail-folder needs path, offset >= 0, mode=error|truncate", http.StatusBadRequest)
			return
		}
		cbt.folder[q.Get("path")] = &folderFault{offset: offset, mode: mode, count: int(num("count", 1))}
	case "clear":
		cbt.lies = map[string][][2]int64{}
		cbt.lieWhich = map[string]string{}
		cbt.failSnap = map[string]types.BaseMethodFault{}
		cbt.folder = map[string]*folderFault{}
	default:
		http.Error(w, "unknown hook "+hook, http.StatusNotFound)
		return
	}
	_, _ = io.WriteString(w, "ok\n")
}
