"""``selma_core.distributed``'s collectives on two real processes (gloo on CPU): rows assembled from
both exactly, in any dtype and any chunk size, a process with no rows included; a wrong split
refused in both processes; agreement and gathering. (Training on several processes:
``tests/phases/test_train_distributed.py``.)"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import free_port

from selma_core import distributed

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64]


def rows_of(dtype) -> torch.Tensor:
    """Four rows of 3 x 5 values, every bit pattern distinct (negative zero and NaN too)."""
    values = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * 1e3
    if dtype.is_floating_point:
        values[0, 0, 0], values[1, 0, 0] = -0.0, float("nan")
    return values.to(dtype)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        SELMA_DIST_TIMEOUT_S="60",
    )
    torch.set_num_threads(1)
    distributed.init("cpu")
    distributed.ASSEMBLE_CHUNK_BYTES = 7  # chunks that cut through values
    results: dict = {}
    for dtype in DTYPES:
        rows = rows_of(dtype)
        mine = [0, 2, 3] if rank == 0 else [1]
        results[f"split {dtype}"] = distributed.assemble_rows(mine, rows[mine], 4)
        # Rank 1 computed no row: it learns their shape and dtype from rank 0.
        results[f"one {dtype}"] = distributed.assemble_rows(
            [0, 1, 2, 3] if rank == 0 else [], rows if rank == 0 else None, 4
        )
    try:  # row 2 computed twice, row 1 by no one: refused in both processes
        distributed.assemble_rows([0, 2] if rank == 0 else [2, 3], rows_of(torch.float32)[:2], 4)
    except ValueError as e:
        results["refused"] = str(e)
    results["all_true"] = [distributed.all_true(True), distributed.all_true(rank == 0)]
    results["gathered"] = distributed.all_gather_object({"rank": rank})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


def test_rows_from_two_processes_are_assembled_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for dtype in DTYPES:
            expected = rows_of(dtype)
            for name in ("split", "one"):
                got = results[f"{name} {dtype}"]
                assert got.dtype == dtype
                # Bits, not values: NaN and -0.0 included.
                assert torch.equal(got.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))
        assert "each computed once" in results["refused"]
        assert results["all_true"] == [True, False]
        assert results["gathered"] == [{"rank": 0}, {"rank": 1}]


def test_one_process_must_name_every_row():
    rows = rows_of(torch.float32)
    assert distributed.assemble_rows([0, 1, 2, 3], rows, 4) is rows
    with pytest.raises(ValueError, match="every row"):
        distributed.assemble_rows([0, 1, 3], rows[:3], 4)
    with pytest.raises(ValueError, match="3 rows named, 4 given"):
        distributed.assemble_rows([0, 1, 2], rows, 4)
    assert distributed.all_true(False) is False and distributed.all_gather_object(1) == [1]
