"""The prepared store's format (plain .npy shards read by row) against maintained streaming formats, on the same rows.

For each format whose package is installed (WebDataset with its indexed reader `wids`, LitData, MosaicML
`streaming`), the Fashion-MNIST train split and a generated 64 px set are written once, then read two ways (each format importable
and working is part of what is measured: MosaicML streaming 0.13 imports transformers when it is imported):
- by index: one epoch in the order a training draws (a seeded permutation, batches of 128), each batch's rows
  gathered into one uint8 array and checked against the source. This is what our trainer needs: its order and
  every augmented view are a function of (seed, epoch, index), so resuming mid-epoch and splitting an epoch over
  ranks are exact.
- in the format's own order: one full pass through its own reader (WebDataset's sequential tar stream, LitData's
  and streaming's StreamingDataset), which is how those libraries are meant to be used and what they are built to
  make fast; there the library, not the trainer, decides the order.
All reads are in one process, page cache warm (each format is read once before it is timed); rows/s is the median
of `repeats` passes. The suite records each package's version; a format whose package is missing is listed as such.
"""
from __future__ import annotations

import importlib.metadata
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Context
from bench.storage import generated
from engine.store import RowFile, ShardedRows

BATCH = 128
SHARD_BYTES = 64 << 20
GENERATED_64 = 20_000


class Npy:
    """Ours: .npy shards of uint8 rows, read by row with pread (engine/store.py)."""
    name, packages = "npy shards (ours)", ()

    def write(self, x: np.ndarray, y: np.ndarray, folder: Path) -> None:
        per = max(1, SHARD_BYTES // x[0].nbytes)
        for n, start in enumerate(range(0, len(x), per)):
            with RowFile(folder / f"images-{n:05d}.npy", len(x[start:start + per])) as f:
                f.write(x[start:start + per])

    def open(self, folder: Path, n: int, row_shape: tuple):
        files = sorted(folder.glob("images-*.npy"))
        per = max(1, SHARD_BYTES // int(np.prod(row_shape)))
        self.rows = ShardedRows(files, [min(per, n - i * per) for i in range(len(files))], row_shape)

    def batch(self, idx: np.ndarray) -> np.ndarray:
        return self.rows[idx].numpy()

    def own_order(self):
        for start in range(0, len(self.rows), BATCH):
            yield self.rows[np.arange(start, min(start + BATCH, len(self.rows)))].numpy()


class WebDataset:
    """WebDataset tar shards; by index through `wids` (its indexed reader), in its own order by the tar stream."""
    name, packages = "WebDataset (tar; wids by index)", ("webdataset", "wids")

    def write(self, x, y, folder):
        import webdataset as wds

        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxsize=SHARD_BYTES, verbose=0) as sink:
            for i in range(len(x)):
                sink.write({"__key__": f"{i:09d}", "img.bin": x[i].tobytes(), "cls": str(int(y[i])).encode()})

    def open(self, folder, n, row_shape):
        import tarfile

        import wids
        import webdataset as wds

        shards = sorted(folder.glob("shard-*.tar"))
        listing = [{"url": str(p), "nsamples": sum(1 for m in tarfile.open(p) if m.name.endswith(".img.bin"))}
                   for p in shards]
        self.indexed = wids.ShardListDataset(listing)
        self.stream = wds.WebDataset([str(p) for p in shards], shardshuffle=False)
        self.row_shape = row_shape

    def _row(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data if isinstance(data, bytes) else data.read(), np.uint8).reshape(self.row_shape)

    def batch(self, idx):
        return np.stack([self._row(self.indexed[int(i)][".img.bin"]) for i in idx])

    def own_order(self):
        return batched(self._row(sample["img.bin"]) for sample in self.stream)


def batched(rows):
    """Stacks of BATCH rows from an iterator of rows."""
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


class _Streaming:
    """A library's StreamingDataset (`self.ds`) of {"x": bytes, "y": int}: by index with ds[i], in its own order by
    iterating it."""

    def _row(self, item) -> np.ndarray:
        return np.frombuffer(item["x"], np.uint8).reshape(self.row_shape)

    def batch(self, idx):
        return np.stack([self._row(self.ds[int(i)]) for i in idx])

    def own_order(self):
        return batched(self._row(item) for item in self.ds)


class LitData(_Streaming):
    """LitData's chunked binary format (litdata.optimize), read by StreamingDataset."""
    name, packages = "LitData (optimize chunks)", ("litdata",)

    def write(self, x, y, folder):
        from litdata import optimize

        rows = [(x[i].tobytes(), int(y[i])) for i in range(len(x))]  # its workers are spawned: rows travel in
        optimize(fn=_litdata_item, inputs=rows, output_dir=str(folder), chunk_bytes=SHARD_BYTES, num_workers=1,
                 mode="overwrite")

    def open(self, folder, n, row_shape):
        from litdata import StreamingDataset

        self.ds, self.row_shape = StreamingDataset(str(folder), shuffle=False), row_shape


def _litdata_item(row: tuple[bytes, int]) -> dict:
    return {"x": row[0], "y": row[1]}


class Mosaic(_Streaming):
    """MosaicML streaming's MDS shards, read by StreamingDataset from a local folder."""
    name, packages = "MosaicML streaming (MDS)", ("mosaicml-streaming",)

    def write(self, x, y, folder):
        from streaming import MDSWriter

        with MDSWriter(out=str(folder), columns={"x": "bytes", "y": "int"}, size_limit=SHARD_BYTES) as out:
            for i in range(len(x)):
                out.write({"x": x[i].tobytes(), "y": int(y[i])})

    def open(self, folder, n, row_shape):
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        self.ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=BATCH)
        self.row_shape = row_shape


FORMATS = (Npy, WebDataset, LitData, Mosaic)


def versions(fmt) -> str | None:
    """"webdataset 1.0.2, wids 0.1.11"; "ours" for ours; None when a package is missing."""
    if not fmt.packages:
        return "ours"
    try:
        return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in fmt.packages)
    except importlib.metadata.PackageNotFoundError:
        return None


def rows_per_s(fn, n: int, repeats: int) -> float:
    fn()  # warm: the page cache and the library's own caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def measure(ctx: Context, fmt, case: str, x: np.ndarray, y: np.ndarray) -> dict:
    folder = ctx.workdir / "formats" / f"{fmt.__name__}-{case.split()[0]}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    way = fmt()
    start = time.perf_counter()
    way.write(x, y, folder)
    write_s = time.perf_counter() - start
    way.open(folder, len(x), x.shape[1:])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).numpy()
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    probe = batches[len(batches) // 2]
    if not np.array_equal(way.batch(probe), x[probe]):
        raise AssertionError(f"{fmt.name}: rows read by index differ from the rows written")

    def by_index():
        for b in batches:
            way.batch(b)

    def own():
        return sum(len(b) for b in way.own_order())

    by_index_rate = rows_per_s(by_index, len(x), ctx.repeats)
    own_rate = rows_per_s(own, len(x), ctx.repeats)
    row = {"case": case, "format": fmt.name, "version": versions(fmt), "write_s": write_s,
           "mb_on_disk": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20,
           "by_index_rows_s": by_index_rate, "own_order_rows_s": own_rate}
    ctx.log(f"  {case}, {fmt.name}: by index {by_index_rate:,.0f} rows/s, own order {own_rate:,.0f} rows/s, "
            f"write {write_s:.1f} s")
    shutil.rmtree(folder, ignore_errors=True)
    return row


def run(ctx: Context) -> dict:
    fashion = ctx.splits.train
    n = ctx.images(len(fashion))
    big = generated(max(256, int(GENERATED_64 * ctx.scale)), 64).train
    cases = {"Fashion-MNIST 28 px": (fashion.x[:n].numpy(), fashion.y[:n].numpy()),
             "generated 64 px": (big.x.numpy(), big.y.numpy())}
    rows, missing, failed = [], [], []
    for fmt in FORMATS:
        if versions(fmt) is None:
            missing.append(" + ".join(fmt.packages))
            continue
        try:
            rows += [measure(ctx, fmt, case, x, y) for case, (x, y) in cases.items()]
        except Exception as e:  # a library that does not import or work here is a finding, not a crash
            failed.append(f"{fmt.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            ctx.log(f"  {failed[-1]}")
    summary = {"not installed here": ", ".join(missing) or "none", "failed here": "; ".join(failed) or "none"}
    for r in rows:
        ours = next(o for o in rows if o["case"] == r["case"] and o["format"] == Npy.name)
        summary[f"{r['case']}, {r['format']}: by index ÷ ours"] = r["by_index_rows_s"] / ours["by_index_rows_s"]
    return {"rows": rows, "summary": summary}
