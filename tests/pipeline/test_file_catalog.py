"""File catalogs (``comb index``, ``find``, ``diff``, the ``files`` and ``file_changes`` views):
a real ext4 image (mkfs.ext4 -d) backed up, changed with debugfs (files written, removed,
rewritten), backed up again; the catalog is stored as changes, equals a fresh walk row for row,
survives forgetting the point it was built on, and answers find and diff."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from combtest import TEST_PASSWORD, CliRunner, assert_one_line_error, flip_byte, need_tool

from catalog.analytics import file_history, file_versions
from catalog.errors import CorruptionError
from catalog.repo import Repository
from catalog.store import filecat
from catalog.store.parquet_io import read_parquet
from drive.files import sandbox
from pipeline.jobs.index import walk_point

CHUNK = 65536


def make_image(tmp_path: Path) -> Path:
    need_tool("mkfs.ext4")
    tree = tmp_path / "tree"
    for d in ("etc/nginx", "home/ann", "var/log"):
        (tree / d).mkdir(parents=True)
    (tree / "etc" / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (tree / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 2;\n")
    (tree / "home" / "ann" / "notes.txt").write_text("notes\n")
    (tree / "var" / "log" / "syslog").write_bytes(os.urandom(300_000))
    for i in range(200):
        (tree / "home" / "ann" / f"f{i:03d}.txt").write_text(f"{i}\n")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, image], check=True, capture_output=True
    )
    return image


def debugfs(image: Path, *requests: str) -> None:
    need_tool("debugfs")
    for request in requests:
        subprocess.run(["debugfs", "-w", "-R", request, image], check=True, capture_output=True)


def backup(cli: CliRunner, repo: Path, image: Path, *more: str) -> dict:
    got = cli("-r", repo, "backup", image, "--source-name", "web", "--json", *more)
    assert got.code == 0, got.err
    return json.loads(got.out.splitlines()[-1])


@pytest.fixture
def history(cli: CliRunner, tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    image = make_image(tmp_path)
    first = backup(cli, repo, image)
    second = backup(cli, repo, image)  # nothing changed
    new = tmp_path / "new.txt"
    new.write_text("server { listen 80; }\n")
    debugfs(
        image,
        f"write {new} /etc/nginx/site.conf",
        "rm /home/ann/notes.txt",
        "rm /etc/fstab",
        f"write {new} /etc/fstab",
    )
    third = backup(cli, repo, image)
    return repo, image, [first, second, third]


def test_catalogs_are_stored_as_changes_and_equal_a_fresh_walk(
    history: tuple[Path, Path, list[dict]],
) -> None:
    repo_path, _, points = history
    first, second, third = (p["file_catalog"] for p in points)
    assert first["walked"] and first["added"] == first["entries"] > 200
    assert not second["walked"] and (second["added"], second["modified"]) == (0, 0)
    assert third["walked"]
    assert (third["added"], third["removed"]) == (1, 1)  # site.conf; notes.txt
    assert third["modified"] == 1  # /etc/fstab rewritten (debugfs leaves folders' times alone)
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    for p in points:
        point = repo.resolve(p["id"])
        stored = filecat.read_listing(repo.storage, point.id)
        fresh, _, _, skipped = walk_point(repo, point)
        assert stored is not None and not skipped
        assert stored.to_pylist() == filecat.sort_listing(fresh).to_pylist()
    docs = [filecat.read_doc(repo.storage, p["id"]) for p in points]
    assert docs[0] is not None and docs[0].full is not None and docs[0].base is None
    assert docs[2] is not None and docs[2].full is None and docs[2].base == points[1]["id"]


def test_find_shows_every_version_and_diff_shows_the_files(
    cli: CliRunner, history: tuple[Path, Path, list[dict]]
) -> None:
    repo, _, points = history
    got = cli("-r", repo, "find", "fstab", "--json")
    assert got.code == 0, got.err
    versions = json.loads(got.out)["versions"]
    assert [(v["path"], v["first_point"], v["points"]) for v in versions] == [
        ("/disk/etc/fstab", points[0]["id"], 2),
        ("/disk/etc/fstab", points[2]["id"], 1),
    ]
    assert [v["size"] for v in versions] == [30, 22]
    assert cli("-r", repo, "find", "*.CONF", "-i", "--json").out.count('"path"') == 2
    assert "/disk/home/ann/f007.txt" in cli("-r", repo, "find", "/disk/home/ann/f00?.txt").out
    diff = cli("-r", repo, "diff", points[0]["id"], points[2]["id"], "--files", "/disk/etc")
    assert diff.code == 0, diff.err
    assert diff.out.splitlines() == ["M /disk/etc/fstab", "+ /disk/etc/nginx/site.conf"]
    whole = json.loads(
        cli("-r", repo, "diff", points[0]["id"], points[2]["id"], "--files", "--json").out
    )
    assert {(c["path"], c["change"]) for c in whole["changes"] if c["kind"] == "file"} == {
        ("/disk/etc/fstab", "modified"),
        ("/disk/etc/nginx/site.conf", "added"),
        ("/disk/home/ann/notes.txt", "removed"),
    }


def test_block_diff_names_exactly_the_chunks_that_differ(
    cli: CliRunner, history: tuple[Path, Path, list[dict]], tmp_path: Path
) -> None:
    repo, image, points = history
    old = tmp_path / "old.img"
    assert cli("-r", repo, "restore", points[0]["id"], old).code == 0
    a, b = old.read_bytes(), image.read_bytes()
    expected = [o for o in range(0, len(b), CHUNK) if a[o : o + CHUNK] != b[o : o + CHUNK]]
    got = json.loads(cli("-r", repo, "diff", points[0]["id"], points[2]["id"], "--json").out)
    chunks = [o for start, n in got["extents"] for o in range(start, start + n, CHUNK)]
    assert chunks == expected and got["changed_bytes"] == len(expected) * CHUNK
    same = json.loads(cli("-r", repo, "diff", points[0]["id"], points[1]["id"], "--json").out)
    assert same["extents"] == []


def test_views_and_forgetting_the_base_point(
    cli: CliRunner, history: tuple[Path, Path, list[dict]]
) -> None:
    repo, _, points = history
    count = "SELECT point_id, count(*) AS n FROM files GROUP BY 1 ORDER BY 2, 1"
    before = json.loads(cli("-r", repo, "query", count, "--json").out)["rows"]
    assert cli("-r", repo, "forget", points[0]["id"], "--prune").code == 0
    after = json.loads(cli("-r", repo, "query", count, "--json").out)["rows"]
    assert after == [r for r in before if r["point_id"] != points[0]["id"]]  # chains still read
    versions = json.loads(cli("-r", repo, "find", "fstab", "--json").out)["versions"]
    assert [(v["first_point"], v["points"]) for v in versions] == [
        (points[0]["id"], 1),  # added by the forgotten point, still in the second
        (points[2]["id"], 1),
    ]
    sql = "SELECT change, path_text FROM file_changes WHERE forgotten ORDER BY path_text LIMIT 2"
    rows = json.loads(cli("-r", repo, "query", sql, "--json").out)["rows"]
    assert rows and all(r["change"] == "added" for r in rows)


def test_index_builds_what_no_files_skipped(cli: CliRunner, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init", "--encryption", "none").code == 0
    image = make_image(tmp_path)
    first = backup(cli, repo, image, "--no-files")
    debugfs(image, "rm /var/log/syslog")
    second = backup(cli, repo, image, "--no-files")
    assert first["file_catalog"] is None and second["file_catalog"] is None
    got = cli("-r", repo, "index", "--all", "--json")
    assert got.code == 0, got.err
    done = [json.loads(line) for line in got.out.splitlines()]
    assert [d["point"] for d in done] == [first["id"], second["id"]]  # oldest first
    assert done[1]["removed"] == 1 and done[1]["added"] == 0
    again = json.loads(cli("-r", repo, "index", second["id"], "--json").out)
    assert again["existed"]
    assert_one_line_error(cli("-r", repo, "index"), "POINT or --all", code=2)
    r = Repository.open(str(repo))
    listing = filecat.read_listing(r.storage, second["id"])
    assert isinstance(listing, pa.Table) and b"/var/log/syslog" not in listing["path"].to_pylist()


def test_diff_files_without_a_catalog_says_how_to_build_it(cli: CliRunner, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    image = make_image(tmp_path)
    p = backup(cli, repo, image, "--no-files")["id"]
    assert_one_line_error(cli("-r", repo, "diff", p, p, "--files"), f"comb index {p}", code=2)
    assert_one_line_error(cli("-r", repo, "diff", p, p, "/etc"), "needs --files", code=2)


def test_file_reports(cli: CliRunner, history: tuple[Path, Path, list[dict]]) -> None:
    repo, _, _ = history
    churn = json.loads(cli("-r", repo, "report", "file-churn", "--json").out)["rows"]
    assert [(r["path"], r["rewrites"], r["size"]) for r in churn] == [("/disk/etc/fstab", 1, 22)]
    growth = json.loads(cli("-r", repo, "report", "file-growth", "--json").out)["rows"]
    by_folder = {r["folder"]: (r["grown_bytes"], r["grown_files"]) for r in growth}
    assert by_folder["/disk/etc/nginx"] == (22, 1)  # site.conf
    assert by_folder["/disk/home/ann"] == (-6, -1)  # notes.txt
    assert by_folder["/disk/etc"] == (22 - 30, 0)  # fstab rewritten shorter
    assert growth[0]["folder"] == "/disk/etc/nginx"


def test_verify_warns_of_a_damaged_catalog(
    cli: CliRunner, history: tuple[Path, Path, list[dict]]
) -> None:
    """A catalog is derived data: its damage is a warning of verify naming the file, not an
    error (every point still restores)."""
    repo_path, _, points = history
    assert cli("-r", repo_path, "verify").code == 0
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    doc = filecat.read_doc(repo.storage, points[2]["id"])
    assert doc is not None
    name = filecat.data_name(doc.changes)
    flip_byte(Path(str(repo.storage.local_path(name))), 40)
    got = cli("-r", repo_path, "verify")
    assert got.code == 0, got.err
    assert f"file catalog: {repo.storage.local_path(name)} does not match its name" in got.err
    os.remove(str(repo.storage.local_path(filecat.doc_name(points[0]["id"]))))
    got = cli("-r", repo_path, "verify")
    assert got.code == 0, got.err
    assert (
        f"{filecat.doc_name(points[1]['id'])}: its base's catalog is missing" in got.out + got.err
    )


def test_a_chain_that_changes_one_entry_again_and_again(cli: CliRunner, tmp_path: Path) -> None:
    """A listing read through a chain of catalogs takes each entry's last change (an entry
    modified, removed, added back, its folder replaced by a file): equal to a fresh walk at
    every point."""
    repo_path = tmp_path / "repo"
    assert cli("-r", repo_path, "init").code == 0
    image = make_image(tmp_path)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("one\n")
    two.write_text("two, longer\n")
    steps = [
        (f"write {one} /etc/nginx/a.conf",),
        ("rm /etc/nginx/a.conf", "rm /etc/fstab", f"write {two} /etc/fstab"),
        ("rm /etc/fstab",),
        (f"write {one} /etc/nginx/a.conf", f"write {two} /etc/fstab"),
        ("rm /etc/nginx/nginx.conf", "rm /etc/nginx/a.conf", "rmdir /etc/nginx"),
        (f"write {one} /etc/nginx",),
    ]
    ids = [backup(cli, repo_path, image)["id"]]
    for requests in steps:
        debugfs(image, *requests)
        ids.append(backup(cli, repo_path, image)["id"])
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    kinds = []
    for point_id in ids:
        point = repo.resolve(point_id)
        stored = filecat.read_listing(repo.storage, point.id)
        fresh, _, _, skipped = walk_point(repo, point)
        assert stored is not None and not skipped
        assert stored.to_pylist() == filecat.sort_listing(fresh).to_pylist()
        rows = {r["path"]: r["kind"] for r in stored.select(["path", "kind"]).to_pylist()}
        kinds.append((rows.get(b"/etc/nginx"), rows.get(b"/etc/fstab")))
    assert kinds[-1] == ("file", "file") and kinds[-3] == ("dir", "file")
    assert (kinds[3][1], kinds[4][1]) == (None, "file")
    docs = [filecat.read_doc(repo.storage, i) for i in ids]
    assert [d.depth for d in docs if d is not None] == list(range(len(ids)))


def test_prune_keeps_catalog_files_while_a_catalog_does_not_read(
    cli: CliRunner, history: tuple[Path, Path, list[dict]]
) -> None:
    """Prune removes catalog files no catalog names (a killed index leaves them), but not while
    a catalog document does not read: the files it names are not known then."""
    repo_path, _, points = history
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    orphan = Path(str(repo.storage.local_path(filecat.data_name("ab" * 32))))
    orphan.write_bytes(b"left by a killed index")
    before = sorted(p.name for p in orphan.parent.iterdir())
    doc = Path(str(repo.storage.local_path(filecat.doc_name(points[2]["id"]))))
    good = doc.read_bytes()
    flip_byte(doc, len(good) // 2)
    assert cli("-r", repo_path, "prune").code == 0
    assert sorted(p.name for p in orphan.parent.iterdir()) == before
    doc.write_bytes(good)
    assert cli("-r", repo_path, "prune").code == 0
    assert sorted(p.name for p in orphan.parent.iterdir()) == [
        n for n in before if n != orphan.name
    ]
    assert cli("-r", repo_path, "verify").code == 0


def test_find_reads_each_catalog_once_then_answers_from_its_cache(
    cli: CliRunner, history: tuple[Path, Path, list[dict]], tmp_path: Path
) -> None:
    """``find`` keeps every catalog's change rows in a local cache (sealed: no file name in
    the clear), reads only the catalogs it has not seen, and answers as it did without it; a
    damaged cache or a catalog document that changed is read again from the repository."""
    repo_path, image, points = history
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    first = file_history.load(repo.storage)
    assert first.read == 3 and not first.problems
    cached = file_history.load(repo.storage)
    assert cached.read == 0
    assert cached.rows.equals(first.rows) and cached.points.equals(first.points)
    path = Path(file_history.cache_path(repo.config.id))
    assert b"nginx" not in path.read_bytes() and b"fstab" not in path.read_bytes()
    before = cli("-r", repo_path, "find", "*.conf", "--json").out
    new = tmp_path / "more.conf"
    new.write_text("more\n")
    debugfs(image, f"write {new} /etc/nginx/more.conf")
    fourth = backup(cli, repo_path, image)["id"]
    grown = file_history.load(repo.storage)
    assert grown.read == 1 and grown.rows.num_rows == first.rows.num_rows + 1
    after = json.loads(cli("-r", repo_path, "find", "*.conf", "--json").out)["versions"]
    assert [v for v in after if v["first_point"] != fourth] == [
        {**v, "points": v["points"] + (v["until"] is None)} for v in json.loads(before)["versions"]
    ]
    flip_byte(path, path.stat().st_size // 2)
    assert file_history.load(repo.storage).read == 4
    os.utime(str(repo.storage.local_path(filecat.doc_name(points[1]["id"]))), ns=(1, 1))
    again = file_history.load(repo.storage)
    assert again.read == 4 and again.rows.sort_by("point_id").equals(grown.rows.sort_by("point_id"))


@pytest.mark.parametrize(
    "pattern",
    ["*.conf", "f00?.txt", "[fn]*", "[!f]*.txt", "*[]]*", "[a-c]?*", "*.CONF", "/disk/etc/*",
     "/disk/*/f01[0-2].txt", "/*", "nginx.conf", "[", "*x*y*", ".*", "f0[!0-4]?.txt",
     "a\\*b", "*\\?*", "a\\[b", "/disk/etc/a\\*b", "*\\\\*"],
)  # fmt: skip
def test_find_matches_names_as_duckdb_glob_does(pattern: str) -> None:
    """The pattern of ``find`` is matched in Arrow (RE2); DuckDB's GLOB, which ``find`` used
    before, is the judge: a pattern without "/" on the name, one with "/" on the whole path.
    Where they part: a "[" that no "]" closes is itself, as in the shell (GLOB matches
    nothing)."""
    names = ["/etc/nginx/nginx.conf", "/etc/fstab", "/home/ann/f007.txt", "/home/ann/f012.txt",
             "/home/ann/notes.txt", "/a]b/x.y", "/etc/A.CONF", "/etc/dir.conf/inner", "/f",
             "/n/.hidden", "/b/a[b", "/odd\\\\name", "/new\nline.conf", "/ü/ñ.conf",
             "/etc/a*b", "/etc/axb", "/q/what?"]  # fmt: skip
    rows = pa.table({"volume": ["disk"] * len(names), "path_text": names})
    con = duckdb.connect()
    con.register("r", rows)
    subject = (
        "'/' || volume || path_text" if "/" in pattern else "regexp_extract(path_text, '[^/]*$')"
    )
    for case in (False, True):
        want = [
            r[0] for r in con.execute(
                f"SELECT path_text FROM r WHERE {'lower(' if case else '('}{subject}) GLOB "
                f"{'lower(' if case else '('}?)", [pattern]
            ).fetchall()
        ]  # fmt: skip
        got = file_versions.matching(rows, pattern, case).column("path_text").to_pylist()
        assert sorted(got) == sorted(want), (pattern, case)
    unclosed = file_versions.matching(rows, "a[b", False).column("path_text").to_pylist()
    assert unclosed == ["/b/a[b"]


def test_find_says_a_bad_pattern_in_one_line(
    cli: CliRunner, history: tuple[Path, Path, list[dict]]
) -> None:
    """A set RE2 refuses (a reversed range) is a usage error, not an internal one."""
    repo, _, _ = history
    assert_one_line_error(cli("-r", repo, "find", "f[z-a].txt"), "bad pattern", code=2)


def test_a_catalog_file_without_a_column_is_damage(
    history: tuple[Path, Path, list[dict]],
) -> None:
    """Reading columns a Parquet file does not have is damage, not an empty table (pyarrow's
    ParquetFile.read leaves a missing column out silently)."""
    repo_path, _, points = history
    repo = Repository.open(str(repo_path), password=TEST_PASSWORD)
    doc = filecat.read_doc(repo.storage, points[0]["id"])
    assert doc is not None
    name = filecat.data_name(doc.changes)
    assert read_parquet(repo.storage, name, ["path"]).num_rows == doc.entries
    with pytest.raises(CorruptionError):
        read_parquet(repo.storage, name, ["path", "no_such_column"])


def test_no_catalog_rather_than_one_without_the_disk_when_comb_changed_under_it(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """comb upgraded in place while a backup runs: its filesystem worker refuses (other code),
    which is not the volume's fault; the backup commits its point and says the catalog is
    missing, and `comb index` builds it later (before: a catalog listing no file was
    committed, with the refusal as a skipped line, and `comb index` kept it)."""
    repo = tmp_path / "repo"
    assert cli("-r", repo, "init").code == 0
    image = make_image(tmp_path)
    monkeypatch.setattr(sandbox, "code_stamp", lambda: "0" * 16)
    got = cli("-r", repo, "backup", image, "--source-name", "web", "--json")
    assert got.code == 0, got.err
    point = json.loads(got.out.splitlines()[-1])
    assert point["file_catalog"] is None
    assert f"no file catalog for {point['id']}" in got.err and "comb index" in got.err
    r = Repository.open(str(repo), password=TEST_PASSWORD)
    assert filecat.read_doc(r.storage, point["id"]) is None
    monkeypatch.undo()
    built = cli("-r", repo, "index", "--all", "--json")
    assert built.code == 0, built.err
    assert json.loads(built.out)["entries"] > 200
