"""Real filesystem and disk images for the file-level restore tests (importable as ``fsimages``).

Owns building images with the real tools (mkfs.ext4 -d, mkfs.xfs + loop mount, mkfs.vfat +
mcopy, mkfs.exfat + exfat-fuse, mkntfs + ntfs-3g, mkfs.btrfs --rootdir), putting them into GPT,
MBR (with logical partitions) or LVM disks, caching them across sessions, and the independent
judge of what an image holds: ``kernel_listing`` mounts it read-only and walks it. The source
tree and its truth (``Item``, ``make_tree``, ``truth_for``) live in tests/fsimages_tree.py.
Every image is sparse. Needs root (loop devices, mount) for all but ext4, vfat and btrfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from combtest import need_tool
from fsimages_tree import Item, make_tree, number_groups, truth_for, walk

__all__ = [
    "Item",
    "make_tree",
    "truth_for",
    "walk",
    "number_groups",
    "ext4_image",
    "xfs_image",
    "fat32_image",
    "exfat_image",
    "ntfs_image",
    "btrfs_image",
    "partitioned",
    "lvm_disk",
    "kernel_listing",
    "mounted",
    "fat_listing",
    "cached",
    "VERSION",
]

# Bump whenever make_tree or a builder changes what an image holds: cached images are keyed by it.
VERSION = 3  # 3: a tree's folders keep their modes under any umask
MiB = 1024 * 1024
FUSE_TYPES = {"ntfs": "ntfs-3g", "exfat": "mount.exfat-fuse"}
LVM_CONFIG = "devices { use_devicesfile=0 } backup { backup=0 archive=0 }"


def _run(
    *cmd: str | os.PathLike[str], env: dict[str, str] | None = None, input_text: str | None = None
) -> str:
    """Runs a tool; a failure raises with the command and its output."""
    args = [os.fspath(c) for c in cmd]
    full_env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", **(env or {})}
    done = subprocess.run(
        args, check=False, capture_output=True, text=True, env=full_env, input=input_text
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {done.returncode}\n"
            f"stdout: {done.stdout.strip()}\nstderr: {done.stderr.strip()}"
        )
    return done.stdout


def _sparse_file(dest: Path, size_mb: int) -> None:
    dest.unlink(missing_ok=True)
    with open(dest, "wb") as fh:
        fh.truncate(size_mb * MiB)


def _dig_holes(path: Path) -> None:
    """Turns zero runs that a copy wrote into holes (FAT and exFAT write every byte)."""
    if shutil.which("fallocate"):
        _run("fallocate", "--dig-holes", path)


def _tree_mb(tree: Path) -> int:
    """The MiB the tree's data takes (allocated blocks, so a sparse file counts little)."""
    total = sum(os.lstat(os.path.join(d, n)).st_blocks for d, _, fs in os.walk(tree) for n in fs)
    return total * 512 // MiB + 1


def _entries(tree: Path) -> int:
    return sum(len(ds) + len(fs) for _, ds, fs in os.walk(tree))


@contextlib.contextmanager
def _loop(image: Path, offset: int = 0, read_only: bool = False) -> Iterator[str]:
    need_tool("losetup")
    args = ["losetup", "--find", "--show", "--offset", str(offset)]
    dev = _run(*args, *(["--read-only"] if read_only else []), image).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


@contextlib.contextmanager
def mounted(image: Path, fstype: str, offset: int = 0, read_only: bool = False) -> Iterator[Path]:
    """``image`` (from ``offset``) mounted on a fresh directory: the kernel, or FUSE for ntfs
    (ntfs-3g) and exfat (exfat-fuse; this machine's kernel has no exfat or vfat)."""
    with _loop(image, offset, read_only) as dev, tempfile.TemporaryDirectory() as mnt:
        opts = ["-o", "ro"] if read_only else []
        if fstype in FUSE_TYPES:
            _run(need_tool(FUSE_TYPES[fstype]), *opts, dev, mnt)
        else:
            _run(need_tool("mount"), "-t", fstype, *opts, dev, mnt)
        try:
            yield Path(mnt)
        finally:
            _run("umount", mnt)


def ext4_image(tree: Path, dest: Path, size_mb: int | None = None) -> Path:
    """mkfs.ext4 -d: no root or mount needed; inodes for every entry of the tree."""
    need_tool("mkfs.ext4")
    entries = _entries(tree)
    _sparse_file(dest, size_mb or 32 + _tree_mb(tree) + entries // 64)
    _run("mkfs.ext4", "-q", "-F", "-L", "comb-ext4", "-N", str(entries + 1024), "-d", tree, dest)
    return dest


def xfs_image(tree: Path, dest: Path, size_mb: int | None = None) -> Path:
    """mkfs.xfs (300 MiB at least), filled through a loop mount with cp -a (hard links kept)."""
    need_tool("mkfs.xfs")
    _sparse_file(dest, size_mb or 300 + _tree_mb(tree) + _entries(tree) // 256)
    _run("mkfs.xfs", "-q", "-f", "-L", "comb-xfs", dest)
    with mounted(dest, "xfs") as mnt:
        _run("cp", "-a", "--sparse=always", f"{tree}/.", mnt)
    return dest


def _copy_kept(tree: Path, dest: Path, fstype: str) -> None:
    """Copies the files and dirs of ``tree`` that ``truth_for(fstype)`` keeps (hard links as
    separate files) into ``dest`` with their mtimes."""
    kept = truth_for(fstype, walk(tree))
    src, out = os.fsencode(tree), os.fsencode(dest)
    for rel, item in kept.items():
        if item.kind == "dir":
            os.makedirs(out + rel, exist_ok=True)
        else:
            shutil.copyfile(src + rel, out + rel)
    for rel in reversed(list(kept)):
        os.utime(out + rel, ns=(kept[rel].mtime_ns, kept[rel].mtime_ns))


def fat32_image(tree: Path, dest: Path, size_mb: int | None = None) -> Path:
    """mkfs.vfat -F 32 filled with mcopy from a copy of what FAT can hold (``truth_for``)."""
    need_tool("mkfs.vfat")
    mcopy = need_tool("mcopy")
    _sparse_file(dest, size_mb or max(64, 16 + 2 * _tree_mb(tree) + 64 + _entries(tree) // 16))
    _run("mkfs.vfat", "-F", "32", "-n", "COMBFAT", dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as stage:
        _copy_kept(tree, Path(stage), "vfat")
        names = sorted(os.listdir(stage))
        env = {"MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}
        _run(mcopy, "-s", "-p", "-m", "-i", dest, *[Path(stage) / n for n in names], "::/", env=env)
    _dig_holes(dest)
    return dest


def exfat_image(tree: Path, dest: Path, size_mb: int | None = None) -> Path:
    """mkfs.exfat filled through exfat-fuse on a loop device (the kernel here has no exfat)."""
    need_tool("mkfs.exfat")
    need_tool("mount.exfat-fuse")
    _sparse_file(dest, size_mb or 16 + 2 * _tree_mb(tree) + 64 + _entries(tree) // 16)
    _run("mkfs.exfat", "-L", "COMBEXFAT", dest)
    with mounted(dest, "exfat") as mnt:
        _copy_kept(tree, mnt, "exfat")
    _dig_holes(dest)
    return dest


def ntfs_image(tree: Path, dest: Path, size_mb: int | None = None) -> Path:
    """mkntfs filled through ntfs-3g with cp -a: names with invalid UTF-8 are refused (the only
    cp errors allowed), symlinks and the fifo become Interix/reparse entries ntfs-3g reads back."""
    need_tool("mkntfs")
    need_tool("ntfs-3g")
    # At least 128 MiB: The Sleuth Kit refuses a sparse run longer than the volume (the 64 MiB
    # sparse file of make_tree), a limit comb's file view inherits (README.md "Known limits").
    _sparse_file(dest, size_mb or max(128, 32 + _tree_mb(tree) + _entries(tree) // 64))
    _run("mkntfs", "-Q", "-F", "-L", "comb-ntfs", dest)
    with mounted(dest, "ntfs") as mnt:
        done = subprocess.run(
            ["cp", "-a", "--sparse=always", f"{tree}/.", mnt], capture_output=True, text=True
        )
    errors = [e for e in done.stderr.splitlines() if "Invalid or incomplete multibyte" not in e]
    if errors:
        raise RuntimeError("cp -a into ntfs-3g failed:\n" + "\n".join(errors))
    return dest


def btrfs_image(tree: Path, dest: Path, size_mb: int | None = None) -> Path:
    """mkfs.btrfs --rootdir (no mount needed)."""
    need_tool("mkfs.btrfs")
    _sparse_file(dest, size_mb or 128 + _tree_mb(tree) + _entries(tree) // 64)
    _run("mkfs.btrfs", "-q", "-f", "-L", "comb-btrfs", "--rootdir", tree, dest)
    _dig_holes(dest)  # --rootdir writes the sparse file's holes as zeros
    return dest


def _part_type(image: Path, table: str) -> str:
    """The partition type for the filesystem in ``image`` (Linux, or Microsoft basic data)."""
    found = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", image], capture_output=True, text=True
    ).stdout.strip()
    windows = found in ("vfat", "exfat", "ntfs")
    if table == "gpt":
        return "EBD0A0A2-B9E5-4433-87C0-68B9B7E5EB99" if windows else "L"
    return {"vfat": "0c", "exfat": "07", "ntfs": "07"}.get(found, "83")


def partitioned(
    dest: Path, parts: list[Path], table: str = "gpt", *, logical: bool = False
) -> Path:
    """A disk image partitioned by sfdisk (1 MiB aligned) holding each image of ``parts`` in its
    partition, in order. MBR with ``logical``: parts after the second go into an extended
    partition as partitions 5, 6, ...; each logical one has 1 MiB before it for its EBR."""
    need_tool("sfdisk")
    if table not in ("gpt", "mbr"):
        raise ValueError(f"table is 'gpt' or 'mbr', not {table!r}")
    sizes = [-(-p.stat().st_size // MiB) for p in parts]
    lines = [f"label: {'gpt' if table == 'gpt' else 'dos'}", "unit: sectors"]
    starts, pos = [], 1
    for i, (part, size) in enumerate(zip(parts, sizes, strict=True)):
        if table == "mbr" and logical and i >= 2:
            if i == 2:
                ext_size = sum(sizes[2:]) + len(sizes[2:])
                lines.append(f"start={pos * 2048}, size={ext_size * 2048}, type=5")
            pos += 1
        starts.append(pos)
        lines.append(f"start={pos * 2048}, size={size * 2048}, type={_part_type(part, table)}")
        pos += size
    _sparse_file(dest, pos + 1)  # 1 MiB at the end for GPT's backup header
    _run("sfdisk", "--no-reread", "--no-tell-kernel", dest, input_text="\n".join(lines) + "\n")
    for part, start in zip(parts, starts, strict=True):
        _run("dd", f"if={part}", f"of={dest}", "bs=1M", f"seek={start}", "conv=notrunc,sparse")
    return dest


def _lvm(*args: str) -> str:
    return _run(args[0], "--config", LVM_CONFIG, *args[1:])


def lvm_disk(dest: Path, fs_image: Path, vg: str = "combvg", lv: str = "root") -> Path:
    """A disk that is one LVM2 PV with VG ``vg`` and LV ``lv`` holding ``fs_image``. No
    device-mapper here: the LV is made inactive (--driverloaded n) and the image written at its
    first extent. The VG exists only while the loop device does (removed in finally)."""
    need_tool("pvcreate")
    size = fs_image.stat().st_size
    _sparse_file(dest, -(-size // MiB) + 16)
    with _loop(dest) as dev:
        try:
            _lvm("pvcreate", "-q", dev)
            _lvm("vgcreate", "-q", vg, dev)
            _lvm(
                "lvcreate",
                "-q",
                "--driverloaded",
                "n",
                "-an",
                "-Zn",
                "-L",
                f"{size}b",
                "-n",
                lv,
                vg,
            )
            pe_start = int(
                _lvm("pvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "pe_start", dev)
            )
            extent = int(
                _lvm(
                    "vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_extent_size", vg
                )
            )
            ranges = _lvm("lvs", "--noheadings", "-o", "seg_pe_ranges", f"{vg}/{lv}").split()
            if len(ranges) != 1:
                raise RuntimeError(f"LV {vg}/{lv} is not one segment: {ranges}")
            first = int(ranges[0].rsplit(":", 1)[1].split("-")[0])
        finally:
            subprocess.run(["vgchange", "--config", LVM_CONFIG, "-an", vg], capture_output=True)
    seek = pe_start + first * extent
    _run(
        "dd",
        f"if={fs_image}",
        f"of={dest}",
        "bs=1M",
        f"seek={seek}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
    )
    return dest


def _probe_type(image: Path, offset: int) -> str:
    with _loop(image, offset, read_only=True) as dev:
        return _run("blkid", "-p", "-o", "value", "-s", "TYPE", dev).strip()


def kernel_listing(image: Path, offset: int = 0, fstype: str | None = None) -> dict[bytes, Item]:
    """What the filesystem at ``offset`` of ``image`` holds, as the kernel (or ntfs-3g /
    exfat-fuse) reads it read-only: the independent judge of comb's listings. Includes what the
    filesystem itself adds (ext4's /lost+found). vfat: see fat_listing (no vfat in this kernel)."""
    fstype = fstype or _probe_type(image, offset)
    if fstype == "vfat" and fstype not in Path("/proc/filesystems").read_text():
        return fat_listing(image, offset)
    with mounted(image, fstype, offset, read_only=True) as mnt:
        return walk(mnt)


def fat_listing(image: Path, offset: int = 0) -> dict[bytes, Item]:
    """A FAT filesystem's files and dirs as mtools reads them (copied out with mcopy, walked):
    modes are not stored (0o777 as truth_for says); mtimes have FAT's 2 s and local time."""
    mcopy = need_tool("mcopy")
    env = {"MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory() as out:
        _run(mcopy, "-s", "-p", "-m", "-n", "-i", f"{image}@@{offset}", "::/*", out, env=env)
        return {rel: replace(item, mode=0o777) for rel, item in walk(Path(out)).items()}


def cached(name: str, build: Callable[[Path], Path]) -> Path:
    """An image built once per VERSION and kept across test sessions in the temp directory:
    ``build(path)`` makes it under a temporary name, renamed into place when it has finished."""
    home = Path(tempfile.gettempdir()) / f"comb-fsimages-{VERSION}"
    home.mkdir(parents=True, exist_ok=True)
    final = home / name
    if final.exists():
        return final
    tmp = home / f".{name}.{os.getpid()}.tmp"
    try:
        built = build(tmp)
        os.replace(built, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
