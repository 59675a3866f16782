"""Pretraining chunks (format 3): manifest.json + per split parquet shards of fixed-length rows (consecutive pieces
of one token stream). Written by PreTrain/preprocess_dataset_for_pretrain_map.py (tokenize, ShardWriter),
read by pretraining, eval and bench (chunk_rows), which also reads the flat token files of format 2 chunk sets."""
import hashlib
import os
from pathlib import Path

from llm_train.atomic import atomic_write_bytes
from llm_train.errors import UserError

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Writing: documents -> token ids -> rows of row_length ids -> one shard file per split and batch.
_TOKENIZERS = {}  # (path, specials) -> tokenizers.Tokenizer; loaded once in the parent, inherited by forked workers


def raw_tokenizer(path, specials=False):
    """The fast tokenizer; specials=False makes "<|endoftext|>" inside a document plain text, never the real token
    (only generated chat documents get the real special tokens)."""
    if (path, specials) not in _TOKENIZERS:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        tok.encode_special_tokens = not specials
        _TOKENIZERS[path, specials] = tok
    return _TOKENIZERS[path, specials]


def _tokenize_rows(batch, tokenizer_path):
    # encode_batch_fast: the same ids as encode_batch without the character offsets (less CPU)
    ids = [None] * len(batch["text"])
    for specials in (False, True):
        rows = [i for i, chat in enumerate(batch["chat"]) if chat == specials]
        if rows:
            encodings = raw_tokenizer(tokenizer_path, specials).encode_batch_fast([batch["text"][i] for i in rows],
                                                                                 add_special_tokens=False)
            for i, e in zip(rows, encodings):
                ids[i] = e.ids
    return {"input_ids": ids}


def tokenize(texts, chat, tokenizer_path, num_proc):
    """list of texts (chat[i]: text i is a generated chat document) -> (all their token ids as one int32 array,
    start and end of text i's ids in it), tokenized by datasets.map in num_proc processes."""
    from datasets import Dataset, Features, List, Value

    num_proc = min(num_proc, len(texts))
    # map gives process r a contiguous 1/num_proc of the rows; dealing the documents round-robin first gives each
    # process the same mix of long and short documents (a batch may be ordered by source); undone below
    order = np.concatenate([np.arange(r, len(texts), num_proc) for r in range(num_proc)])
    ds = Dataset.from_dict({"text": [texts[i] for i in order], "chat": [chat[i] for i in order]})
    out = ds.map(_tokenize_rows, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=["text", "chat"], fn_kwargs={"tokenizer_path": tokenizer_path}, keep_in_memory=True,
                 features=Features({"input_ids": List(Value("int32"))}), new_fingerprint=os.urandom(8).hex())
    ids = out.data.table.column("input_ids").combine_chunks()
    values = ids.flatten().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    starts, ends = np.empty(len(texts), np.int64), np.empty(len(texts), np.int64)
    starts[order], ends[order] = offsets[:-1], offsets[1:]
    return values, starts, ends


def doc_hash_fraction(text):
    """A stable number in [0, 1) from a document's text: decides its split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def join_with_eot(values, starts, ends, docs, eot_id):
    """The token ids of documents `docs` (indices into starts/ends), each followed by eot_id, as one int32 array."""
    eot = np.array([eot_id], dtype=np.int32)
    return np.concatenate([part for d in docs for part in (values[starts[d]:ends[d]], eot)])


def rows_starting_with_chats(values, starts, ends, chats, eot_id, row_length, text):
    """Rows that each start with a chat document and hold as many of the next whole chats as fit (each + eot; a
    chat longer than a row is cut at the row's end), filled up with the text stream `text`. Returns (the rows, the
    text not used). GPT-2's positions are learned: a chat document that starts at a chat boundary near position 0
    is learned from fewer examples than one packed at any offset, and packed chats (not one per row) put several
    problems in every row. When the text runs out, the chats left are packed into the stream like text."""
    rows, used, n = [], 0, 0
    while n < len(chats):
        parts, length, first = [], 0, n
        while n < len(chats):
            ids = np.append(values[starts[chats[n]]:ends[chats[n]]], np.int32(eot_id))
            if parts and length + len(ids) > row_length:
                break
            parts.append(ids[:row_length])
            length += len(parts[-1])
            n += 1
        fill = text[used:used + row_length - length]
        if length + len(fill) < row_length:
            return rows, np.concatenate([text[used:], join_with_eot(values, starts, ends, chats[first:], eot_id)])
        used += len(fill)
        rows.append(np.concatenate([*parts, fill]).astype(np.int32))
    return rows, text[used:]


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


PARQUET_GROUP_BYTES = 1 << 20  # a row group holds about this many bytes of token ids (one data page), at most
PARQUET_GROUP_ROWS = 4096  # rows (pyarrow starts a new page after 20,000)


def write_shard(path, tokens, row_length, dtype):
    """Write tokens (whole rows of row_length ids) as a parquet shard, atomically (temp file, then rename): one
    column input_ids of fixed_size_list<uint16 or uint32, row_length>, a row per row, readable as such by pyarrow,
    pandas and datasets.load_dataset("parquet"). Laid out for reading rows in place (ParquetRows): no compression,
    no dictionary, PLAIN encoding (4-byte little-endian values: parquet stores uint16 as INT32) and one data page per
    row group, so a row group's values are the last bytes of its column chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dtype = np.dtype(dtype)
    values = pa.array(np.asarray(tokens).astype(dtype).reshape(-1))
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, row_length)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, min(PARQUET_GROUP_ROWS, PARQUET_GROUP_BYTES // (4 * row_length))),
                   data_page_size=4 * PARQUET_GROUP_BYTES, compression="none", use_dictionary=False,
                   write_statistics=False, store_schema=True)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class ShardWriter:
    """Packs each split's tokenized documents into rows of row_length ids and writes a batch's complete rows as one
    shard per split, directory/{split}/shard_NNNNN.parquet. Its state is `splits` ({split: {shards, rows, carry, ...}},
    updated in place): the carry (the stream's rest, less than a row) is all a resumed run needs besides counts."""

    def __init__(self, directory, splits, row_length, dtype, eot_id):
        self.directory, self.splits, self.row_length, self.dtype, self.eot_id = (
            Path(directory), splits, row_length, dtype, eot_id)
        self.pending = {s: [np.asarray(info["carry"], dtype=np.int32)] for s, info in splits.items()}  # the stream
        self.chat_rows = {s: [] for s in splits}  # this batch's rows that start with a chat document

    def add(self, split, values, starts, ends, docs, is_chat):
        """Documents `docs` (indices into starts/ends) of one split: text documents go to the split's token stream
        (each followed by end-of-text), chat documents each start a row of their own, filled up from the stream."""
        texts = [k for k in docs if not is_chat[k]]
        if texts:
            self.pending[split].append(join_with_eot(values, starts, ends, texts, self.eot_id))
        chats = [k for k in docs if is_chat[k]]
        if chats:
            self.chat_rows[split], rest = rows_starting_with_chats(values, starts, ends, chats, self.eot_id,
                                                                   self.row_length, np.concatenate(self.pending[split]))
            self.pending[split] = [rest]

    def flush(self, log=print):
        """Write each split's complete rows (its chat rows first) as one shard; keep the rest as its carry."""
        for split, info in self.splits.items():
            stream = np.concatenate(self.pending[split])
            n_text_rows = len(stream) // self.row_length
            n_rows = n_text_rows + len(self.chat_rows[split])
            if n_rows:
                rel = f"{split}/shard_{len(info['shards']):05d}.parquet"
                write_shard(self.directory / rel, np.concatenate(
                    [*self.chat_rows[split], stream[: n_text_rows * self.row_length]]), self.row_length, self.dtype)
                info["shards"].append(rel)
                info["rows"] += n_rows
                stream = stream[n_text_rows * self.row_length:]
                log(f"wrote {rel} ({n_rows:,} rows)")
            self.pending[split], self.chat_rows[split] = [stream], []
            info["carry"] = stream.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Reading: the rows of a split, a batch at a time.
FORMATS = {2: "flat token files, read as they are", 3: "parquet shards"}  # manifest "format" -> what it is


def check_format(manifest, manifest_path, reader, rerun):
    """A UserError unless the manifest's chunks are in a format chunk_rows reads (3, or 2 of older runs)."""
    if manifest.get("format") not in FORMATS:
        raise UserError(f"{manifest_path}: chunks in format {manifest.get('format')!r}, {reader} reads format 3 "
                        f"(parquet) or 2 (flat token files): {rerun}")


class ChunkRows:
    """The rows of one split, read from its shard files only when indexed: rows[index array or slice] -> (n,
    context + 1) array. Nothing is loaded up front and no file is mapped, so a rank holds only the rows of its
    current batch whatever the chunk set's size (np.memmap would read the same bytes, but every page it touched would
    count in the rank's resident memory until the kernel reclaims it, growing over an epoch to the whole split). If
    the context is smaller than the chunks' rows, each row is cut into windows of context + 1 tokens sharing one
    boundary token: index i is window i // n_rows of row i % n_rows. Subclasses read the shards of one format."""

    def __init__(self, paths, shard_rows, row_length, dtype, context_length, vocab_size):
        self.paths, self.row_length, self.dtype = paths, row_length, np.dtype(dtype)
        self.context_length, self.vocab_size = context_length, vocab_size
        self.starts = np.cumsum([0, *shard_rows])  # first row of each shard
        self.n_rows = int(self.starts[-1])
        self.windows = (row_length - 1) // context_length
        self.files = {}  # shard -> its open file, opened on first use (closed when the reader is garbage collected)
        self.value = self.dtype  # the dtype of the ids read (before the vocabulary check)

    def __len__(self):
        return self.n_rows * self.windows

    def __getitem__(self, index):
        index = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index, np.int64)
        if index.ndim != 1 or (len(index) and not 0 <= index.min() <= index.max() < len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1} (or not a 1-d index)")
        window, row = np.divmod(index, self.n_rows)
        shard = np.searchsorted(self.starts, row, side="right") - 1
        out = np.empty((len(index), self.context_length + 1), self.value)
        for s in np.unique(shard).tolist():
            k = np.flatnonzero(shard == s)
            out[k] = self._read(s, row[k] - self.starts[s], window[k] * self.context_length)
        bad = np.flatnonzero((out >= self.vocab_size).any(1))
        if len(bad):  # a corrupt or foreign shard: say which, before an embedding lookup fails somewhere
            s, r = int(shard[bad[0]]), int(row[bad[0]] - self.starts[shard[bad[0]]])
            raise UserError(f"{self.paths[s]}, row {r}: token id outside the vocabulary (size {self.vocab_size}): "
                            "the chunks do not belong to this tokenizer/model")
        return out

    def _read(self, shard, rows, offsets):
        """(len(rows), context + 1) token ids: rows `rows` of shard `shard` from token `offsets` on."""
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):  # np.asarray(rows): every row, in memory (small sets and tests only)
        return self[:] if dtype is None else self[:].astype(dtype)


class FlatRows(ChunkRows):
    """Format 2: each shard is its rows back to back as raw token ids; a row is one pread."""

    def _read(self, shard, rows, offsets):
        if shard not in self.files:
            self.files[shard] = open(self.paths[shard], "rb", buffering=0)
        fd, width, size = self.files[shard].fileno(), self.context_length + 1, self.dtype.itemsize
        out = np.empty((len(rows), width), self.dtype)
        for k, (r, o) in enumerate(zip(rows.tolist(), offsets.tolist())):
            out[k] = np.frombuffer(os.pread(fd, width * size, (r * self.row_length + o) * size), self.dtype)
        return out


class ParquetRows(ChunkRows):
    """Format 3: parquet shards as write_shard lays them out. A row is read in place, one pread like a flat file's:
    its row group's values are the last bytes of the group's column chunk (found in the footer, read once by
    chunk_rows), 4-byte little-endian ids. The first read of a shard checks that layout: its first row group read
    in place equals the group read by pyarrow. (Reading whole row groups with pyarrow instead costs ~1-4 ms a batch
    and, with every shard's footer held open, memory that grows with the data: ~700 bytes per row group.)"""

    def __init__(self, paths, groups, *args):
        # per shard: (first row of each row group, the end of each row group's column chunk in the file)
        self.group_starts = [np.cumsum([0, *rows]) for rows, _ in groups]
        self.group_ends = [np.asarray(ends, np.int64) for _, ends in groups]
        super().__init__(paths, [int(s[-1]) for s in self.group_starts], *args)
        self.value = np.dtype("<u4")  # parquet's INT32, as stored

    def _read(self, shard, rows, offsets):
        if shard not in self.files:
            file = open(self.paths[shard], "rb", buffering=0)
            self._check_layout(shard, file.fileno())
            self.files[shard] = file
        fd, width, size = self.files[shard].fileno(), self.context_length + 1, self.value.itemsize
        starts, ends = self.group_starts[shard], self.group_ends[shard]
        group = np.searchsorted(starts, rows, side="right") - 1
        at = (ends[group] - (starts[group + 1] - rows) * self.row_length * size + offsets * size).tolist()
        out = np.empty((len(rows), width), self.value)
        for k, position in enumerate(at):
            out[k] = np.frombuffer(os.pread(fd, width * size, position), self.value)
        return out

    def _check_layout(self, shard, fd):
        import pyarrow.parquet as pq

        size = int(self.group_starts[shard][1]) * self.row_length * self.value.itemsize
        in_place = np.frombuffer(os.pread(fd, size, int(self.group_ends[shard][0]) - size), self.value)
        with pq.ParquetFile(self.paths[shard], memory_map=False) as f:
            group = f.read_row_group(0, columns=["input_ids"], use_threads=False)[0]
        group = group.combine_chunks().flatten().to_numpy()
        if len(in_place) != len(group) or (in_place != group).any():
            raise UserError(f"{self.paths[shard]}: not laid out as this project writes parquet shards (one "
                            "uncompressed data page per row group): re-run preprocessing")


def chunk_rows(chunks_dir, manifest, split, context_length, vocab_size):
    """The rows of a split (of the read manifest.json of chunks_dir) as a ChunkRows reader: the shard files are
    checked (present, rows of the manifest's row_length and dtype, the manifest's row count) but their rows not read
    (a parquet shard's footer is)."""
    row_length, dtype, parquet = manifest["row_length"], np.dtype(manifest["dtype"]), manifest.get("format") == 3
    paths, shard_sizes = [], []
    for rel in manifest["splits"][split]["shards"]:
        path = Path(chunks_dir) / rel
        if not path.is_file():
            raise UserError(f"{path} (listed in {Path(chunks_dir) / 'manifest.json'}) is missing: re-run preprocessing")
        paths.append(path)
        shard_sizes.append(_parquet_groups(path, row_length, dtype) if parquet else _flat_rows(path, row_length, dtype))
    n_rows = sum(sum(rows) for rows, _ in shard_sizes) if parquet else sum(shard_sizes)
    if n_rows != manifest["splits"][split]["rows"]:
        raise UserError(f"{chunks_dir}: the {split} shards hold {n_rows} rows, the manifest says "
                        f"{manifest['splits'][split]['rows']}: re-run preprocessing")
    return (ParquetRows if parquet else FlatRows)(paths, shard_sizes, row_length, dtype, context_length, vocab_size)


def _flat_rows(path, row_length, dtype):
    size = path.stat().st_size
    if size % (row_length * dtype.itemsize):
        raise UserError(f"{path}: {size} bytes is not a whole number of rows of {row_length} {dtype.name} token "
                        "ids (truncated, or not this manifest's shard): re-run preprocessing")
    return size // (row_length * dtype.itemsize)


def _parquet_groups(path, row_length, dtype):
    """(rows, end of the column chunk) of each row group of a parquet shard, from its footer; checked to hold rows
    of row_length ids of the manifest's dtype, stored uncompressed and PLAIN without a dictionary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        field = meta.schema.to_arrow_schema().field("input_ids").type
    except (pa.ArrowException, OSError, KeyError) as e:
        raise UserError(f"{path}: not a parquet shard of token rows ({str(e).splitlines()[0]}; truncated, or not "
                        "this manifest's shard): re-run preprocessing") from None
    if not pa.types.is_fixed_size_list(field) or (field.list_size, field.value_type) != (
            row_length, pa.from_numpy_dtype(dtype)):
        rows = f"{field.list_size} {field.value_type}" if pa.types.is_fixed_size_list(field) else f"{field}:"
        raise UserError(f"{path}: its rows are {rows} token ids, not the manifest's {row_length} {dtype.name} (not "
                        "this manifest's shard): re-run preprocessing")
    rows, ends = [], []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunk = group.column(0)
        if (meta.num_columns != 1 or chunk.physical_type != "INT32" or chunk.compression != "UNCOMPRESSED"
                or chunk.has_dictionary_page or "PLAIN" not in chunk.encodings
                or chunk.total_compressed_size < 4 * row_length * group.num_rows):
            raise UserError(f"{path}: not laid out as this project writes parquet shards (one INT32 column, "
                            "uncompressed, PLAIN): re-run preprocessing")
        rows.append(group.num_rows)
        ends.append(chunk.data_page_offset + chunk.total_compressed_size)
    return rows, ends
