"""The stage contract: Fused wiring refuses mismatched schemas; failures name stage and extent."""

from __future__ import annotations

import errno
import pickle

import pyarrow as pa
import pytest

from catalog.errors import SourceError, StageError
from stages.base import Fused, Ports, Stage
from stages.schemas import CHUNKS, EXTENTS, MAIN_PORT, RAW

SIDE = pa.schema([("n", pa.int64())])


class Double(Stage):
    name = "double"
    input_schema = EXTENTS
    output_schema = EXTENTS

    def process(self, batch: pa.Table) -> Ports:
        return {
            MAIN_PORT: pa.table(
                [
                    batch.column("offset"),
                    pa.array([2 * v for v in batch.column("length").to_pylist()]),
                ],
                schema=EXTENTS,
            )
        }


class Buffer(Stage):
    """Holds everything until flush; counts rows on a side port."""

    name = "buffer"
    input_schema = EXTENTS
    output_schema = EXTENTS
    side_schemas = {"count": SIDE}

    def __init__(self) -> None:
        self.held: list[pa.Table] = []
        self.torn_down = False

    def process(self, batch: pa.Table) -> Ports:
        self.held.append(batch)
        return {"count": pa.table({"n": [batch.num_rows]}, schema=SIDE)}

    def flush(self) -> Ports:
        return {MAIN_PORT: pa.concat_tables(self.held)} if self.held else {}

    def teardown(self) -> None:
        self.torn_down = True


class Fail(Stage):
    name = "failer"
    input_schema = EXTENTS
    output_schema = EXTENTS

    def __init__(self, err: Exception, on_flush: bool = False) -> None:
        self.err = err
        self.on_flush = on_flush

    def process(self, batch: pa.Table) -> Ports:
        if not self.on_flush:
            raise self.err
        return {MAIN_PORT: batch}

    def flush(self) -> Ports:
        raise self.err


class ToRaw(Stage):
    name = "toraw"
    input_schema = EXTENTS
    output_schema = RAW


def _extents(*pairs: tuple[int, int]) -> pa.Table:
    return pa.table(
        [pa.array([p[0] for p in pairs], pa.int64()), pa.array([p[1] for p in pairs], pa.int64())],
        schema=EXTENTS,
    )


def test_fused_refuses_mismatched_schemas() -> None:
    class WantsChunks(Stage):
        name = "wants"
        input_schema = CHUNKS
        output_schema = CHUNKS

    with pytest.raises(TypeError, match="cannot connect stage toraw to wants"):
        Fused([ToRaw(), WantsChunks()])
    with pytest.raises(ValueError):
        Fused([])


def test_fused_chains_stages_and_collects_side_ports() -> None:
    buf = Buffer()
    f = Fused([Double(), buf, Double()])
    assert f.name == "double+buffer+double"
    assert f.input_schema.equals(EXTENTS) and f.output_schema.equals(EXTENTS)
    assert set(f.side_schemas) == {"count"}
    f.setup()
    out = f.process(_extents((0, 1), (10, 2)))
    assert MAIN_PORT not in out
    assert out["count"].column("n").to_pylist() == [2]
    f.process(_extents((20, 3)))
    done = f.flush()
    # Buffered rows leave on flush and still pass through the downstream stage.
    assert done[MAIN_PORT].column("length").to_pylist() == [4, 8, 12]
    f.teardown()
    assert buf.torn_down


def test_failure_names_stage_and_extent() -> None:
    f = Fused([Fail(ValueError("bad thing")), Double()])
    with pytest.raises(StageError) as err:
        f.process(_extents((65536, 65536), (262144, 131072)))
    msg = str(err.value)
    assert msg == "stage failer failed on extent 65536+327680: ValueError: bad thing"
    assert isinstance(err.value.__cause__, ValueError)


def test_os_errors_and_comb_errors_keep_their_own_words() -> None:
    f = Fused([Fail(OSError(errno.EIO, "Input/output error"))])
    with pytest.raises(
        StageError, match=r"stage failer failed on extent 0\+4096: Input/output error$"
    ):
        f.process(_extents((0, 4096)))
    g = Fused([Fail(SourceError("source /x ended at offset 7"))])
    with pytest.raises(StageError, match="failed on extent 0\\+1: source /x ended at offset 7$"):
        g.process(_extents((0, 1)))


def test_failure_on_flush_is_at_end_of_job() -> None:
    f = Fused([Double(), Fail(RuntimeError("disk full"), on_flush=True)])
    f.process(_extents((0, 1)))
    with pytest.raises(
        StageError, match="stage failer failed at end of job: RuntimeError: disk full"
    ):
        f.flush()


def test_teardown_releases_every_stage_even_if_one_fails() -> None:
    class BadTeardown(Double):
        def teardown(self) -> None:
            raise RuntimeError("nope")

    buf = Buffer()
    f = Fused([buf, BadTeardown()])
    f.teardown()
    assert buf.torn_down


def test_stage_errors_pickle() -> None:
    err = StageError("stage reader failed on extent 0+1: boom")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, StageError) and str(back) == str(err) and back.exit_code == 8


class Spin(Stage):
    """Burns CPU in a named part of its work, and some outside it."""

    name = "spin"
    input_schema = EXTENTS
    output_schema = EXTENTS

    def __init__(self) -> None:
        self.part = 0.0

    def cpu_parts(self) -> dict[str, float]:
        return {"spin part": self.part}

    def process(self, batch: pa.Table) -> Ports:
        import time

        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.03:
            pass
        self.part += time.thread_time() - t0
        while time.thread_time() - t0 < 0.05:
            pass
        return {MAIN_PORT: batch}


def test_fused_counts_cpu_per_stage_and_part() -> None:
    spin = Spin()
    fused = Fused([Double(), spin])
    batch = pa.table({"offset": [0], "length": [1]}, schema=EXTENTS)
    for _ in range(3):
        fused.process(batch)
    fused.flush()
    prof = fused.cpu_by_stage()
    assert set(prof) == {"double", "spin", "spin part"}
    assert prof["spin part"] == pytest.approx(spin.part)
    assert 0.085 <= prof["spin part"] <= 0.2  # 3 x 30 ms in the part
    assert 0.055 <= prof["spin"] <= 0.2  # 3 x 20 ms outside it, under the stage's name
    assert prof["double"] < 0.05
