"""Planning: aligning and intersecting ranges, work items, and the changed-extents file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catalog.errors import ChangeListError
from pipeline.jobs.plan import align, intersect, parse_changed_extents, total, work_items

C = 4096


def test_align_expands_clamps_sorts_and_merges() -> None:
    assert align([], C, 100 * C) == []
    assert align([(10, 20)], C, 100 * C) == [(0, C)]
    assert align([(C, 2 * C)], C, 100 * C) == [(C, 2 * C)]
    assert align([(5 * C + 1, 5 * C + 2), (C - 1, C + 1)], C, 100 * C) == [
        (0, 2 * C),
        (5 * C, 6 * C),
    ]
    # Touching and overlapping ranges merge.
    assert align([(0, C), (C, 2 * C), (C + 5, 3 * C)], C, 100 * C) == [(0, 3 * C)]
    # The unaligned end of the disk clamps the last chunk.
    assert align([(10 * C - 1, 10 * C + 5)], C, 10 * C + 100) == [(9 * C, 10 * C + 100)]
    assert align([(0, 0)], C, 10 * C) == []


def test_intersect() -> None:
    a = [(0, 10), (20, 30), (40, 50)]
    b = [(5, 25), (28, 45)]
    assert intersect(a, b) == [(5, 10), (20, 25), (28, 30), (40, 45)]
    assert intersect(a, []) == [] and intersect([], b) == []
    assert intersect([(0, 100)], [(10, 20), (30, 40)]) == [(10, 20), (30, 40)]
    assert intersect([(0, 10)], [(10, 20)]) == []
    assert total(a) == 30


def test_work_items_cut_at_batch_size() -> None:
    ranges = [(0, 5 * C), (10 * C, 11 * C), (20 * C, 27 * C)]
    items = list(work_items(ranges, 3 * C, C))
    assert [it.seq for it in items] == list(range(len(items)))
    assert [it.ranges for it in items] == [
        [(0, 3 * C)],
        [(3 * C, 5 * C), (10 * C, 11 * C)],
        [(20 * C, 23 * C)],
        [(23 * C, 26 * C)],
        [(26 * C, 27 * C)],
    ]
    assert [it.end for it in items] == [3 * C, 11 * C, 23 * C, 26 * C, 27 * C]
    assert sum(it.bytes for it in items) == total(ranges)
    t = items[1].table()
    assert t.column("offset").to_pylist() == [3 * C, 10 * C]
    assert t.column("length").to_pylist() == [2 * C, C]


def test_work_items_round_the_batch_to_whole_chunks() -> None:
    items = list(work_items([(0, 10 * C)], 3 * C + 5, C))
    assert all(it.bytes % C == 0 for it in items)
    assert [it.bytes for it in items] == [3 * C, 3 * C, 3 * C, C]
    tiny = list(work_items([(0, 3 * C)], 1, C))
    assert [it.bytes for it in tiny] == [C, C, C]
    assert list(work_items([], 3 * C, C)) == []


def _file(tmp_path: Path, content: object) -> str:
    path = tmp_path / "changes.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_parse_changed_extents(tmp_path: Path) -> None:
    doc = [{"offset": 0, "length": 10}, {"offset": 100, "length": 0}, {"length": 5, "offset": 995}]
    assert parse_changed_extents(_file(tmp_path, doc), 1000) == [(0, 10), (995, 1000)]
    assert parse_changed_extents(_file(tmp_path, []), 1000) == []
    assert parse_changed_extents(_file(tmp_path, [{"offset": 1000, "length": 0}]), 1000) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ({"offset": 0, "length": 1}, "must hold a JSON array"),
        ([[0, 10]], "item 0 must be an object"),
        ([{"offset": 0}], "item 0 must be an object with exactly"),
        ([{"offset": 0, "length": 1, "extra": 2}], "item 0 must be an object"),
        ([{"offset": 0, "length": 1}, {"offset": "5", "length": 1}], "item 1 has non-integer"),
        ([{"offset": 0.5, "length": 1}], "non-integer"),
        ([{"offset": True, "length": 1}], "non-integer"),
        ([{"offset": None, "length": 1}], "non-integer"),
        ([{"offset": -1, "length": 1}], "item 0 is negative"),
        ([{"offset": 0, "length": -5}], "is negative"),
        ([{"offset": 990, "length": 11}], r"item 0 \(990\+11\) is beyond the end"),
        ([{"offset": 2000, "length": 0}], "beyond the end of the source \\(1000 bytes\\)"),
    ],
)
def test_parse_changed_extents_errors(tmp_path: Path, content: object, message: str) -> None:
    path = _file(tmp_path, content)
    with pytest.raises(ChangeListError, match=message) as err:
        parse_changed_extents(path, 1000)
    assert path in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_changed_extents_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ChangeListError, match="cannot read changed-extents file .*nope.json"):
        parse_changed_extents(str(tmp_path / "nope.json"), 1000)
