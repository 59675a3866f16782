"""Pretraining chunks (format 2, PreTrain/preprocess_dataset_for_pretrain_map.py): manifest.json + per split flat
token files of fixed-length rows (consecutive pieces of one token stream), read by pretraining, eval and bench."""
import os
from pathlib import Path

from llm_train.errors import UserError

import numpy as np


class ChunkRows:
    """The rows of one split, read from its shard files only when indexed: rows[index array or slice] -> (n,
    context + 1) array. Nothing is loaded up front and no file is mapped, so a rank holds only the rows of its
    current batch whatever the chunk set's size (np.memmap would read the same bytes, but every page it touched would
    count in the rank's resident memory until the kernel reclaims it, growing over an epoch to the whole split). If
    the context is smaller than the chunks' rows, each row is cut into windows of context + 1 tokens sharing one
    boundary token: index i is window i // n_rows of row i % n_rows."""

    def __init__(self, paths, shard_rows, row_length, dtype, context_length, vocab_size):
        self.paths, self.row_length, self.dtype = paths, row_length, np.dtype(dtype)
        self.context_length, self.vocab_size = context_length, vocab_size
        self.starts = np.cumsum([0, *shard_rows])  # first row of each shard
        self.n_rows = int(self.starts[-1])
        self.windows = (row_length - 1) // context_length
        self.files = {}  # shard -> its file, opened on first use (closed when the reader is garbage collected)

    def __len__(self):
        return self.n_rows * self.windows

    def __getitem__(self, index):
        index = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index, np.int64)
        if index.ndim != 1 or (len(index) and not 0 <= index.min() <= index.max() < len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1} (or not a 1-d index)")
        window, row = np.divmod(index, self.n_rows)
        shard = np.searchsorted(self.starts, row, side="right") - 1
        width = self.context_length + 1
        out = np.empty((len(index), width), self.dtype)
        for k, (s, r, w) in enumerate(zip(shard.tolist(), row.tolist(), window.tolist())):
            if s not in self.files:
                self.files[s] = open(self.paths[s], "rb", buffering=0)
            offset = ((r - int(self.starts[s])) * self.row_length + w * self.context_length) * self.dtype.itemsize
            out[k] = np.frombuffer(os.pread(self.files[s].fileno(), width * self.dtype.itemsize, offset), self.dtype)
        bad = np.flatnonzero((out >= self.vocab_size).any(1))
        if len(bad):  # a corrupt or foreign shard: say which, before an embedding lookup fails somewhere
            s, r = int(shard[bad[0]]), int(row[bad[0]] - self.starts[shard[bad[0]]])
            raise UserError(f"{self.paths[s]}, row {r}: token id outside the vocabulary (size {self.vocab_size}): "
                            "the chunks do not belong to this tokenizer/model")
        return out

    def __array__(self, dtype=None, copy=None):  # np.asarray(rows): every row, in memory (small sets and tests only)
        return self[:] if dtype is None else self[:].astype(dtype)


def chunk_rows(chunks_dir, manifest, split, context_length, vocab_size):
    """The rows of a split (of the read manifest.json of chunks_dir) as a ChunkRows reader: the shard files are
    checked (present, whole rows, the manifest's row count) but not read."""
    row_length, dtype = manifest["row_length"], np.dtype(manifest["dtype"])
    paths, shard_rows = [], []
    for rel in manifest["splits"][split]["shards"]:
        path = Path(chunks_dir) / rel
        if not path.is_file():
            raise UserError(f"{path} (listed in {Path(chunks_dir) / 'manifest.json'}) is missing: re-run preprocessing")
        size = path.stat().st_size
        if size % (row_length * dtype.itemsize):
            raise UserError(f"{path}: {size} bytes is not a whole number of rows of {row_length} {dtype.name} token "
                            "ids (truncated, or not this manifest's shard): re-run preprocessing")
        paths.append(path)
        shard_rows.append(size // (row_length * dtype.itemsize))
    if sum(shard_rows) != manifest["splits"][split]["rows"]:
        raise UserError(f"{chunks_dir}: the {split} shards hold {sum(shard_rows)} rows, the manifest says "
                        f"{manifest['splits'][split]['rows']}: re-run preprocessing")
    return ChunkRows(paths, shard_rows, row_length, dtype, context_length, vocab_size)
