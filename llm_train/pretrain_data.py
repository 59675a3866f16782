"""Pretraining data: the chunks manifest checked against the tokenizer, the train/val rows, the rows of each
optimizer step (Batches) and the val rows a validation reads. The chunks are PreTrain/preprocess_dataset_for_
pretrain_map.py's (manifest.json + parquet shards, read by llm_train.chunks)."""
import hashlib
import json
from pathlib import Path

from llm_train.chunks import check_format, chunk_rows
from llm_train.errors import UserError
from llm_train.lineage import read_lineage
from llm_train.tokenizer import tokenizer_fingerprint

import numpy as np
import torch

PREPROCESS = "python PreTrain/preprocess_dataset_for_pretrain_map.py"


def read_manifest(chunks_dir, tokenizer_dir):
    """chunks_dir's manifest.json, checked to be chunks of format 3 (or 2) made with the tokenizer in tokenizer_dir."""
    path = Path(chunks_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no chunks: {path} not found. Run `{PREPROCESS}` first (or pass --chunks-dir)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        _ = manifest["splits"]["train"]["shards"], manifest["context_length"], manifest["row_length"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a chunks manifest: re-run the preprocessing stage") from None
    check_format(manifest, path, "this script", f"re-run `{PREPROCESS} --force` with your settings")
    if manifest.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer_dir):
        raise UserError(tokenizer_mismatch(chunks_dir, tokenizer_dir, manifest))
    return manifest


def tokenizer_mismatch(chunks_dir, tokenizer_dir, manifest):
    """What to do about chunks made with another tokenizer than tokenizer_dir's. Re-chunking with this tokenizer
    always works (into chunks_dir, at the chunks' context length); the tokenizer the chunks were made with is named
    only while its directory still holds it (a tokenizer retrained in place is gone: its dir now holds this one)."""
    made_with = (read_lineage(chunks_dir) or {}).get("parents", {}).get("tokenizer", {}).get("path")
    still_there = made_with is not None and (Path(made_with) / "tokenizer.json").is_file() and (
        tokenizer_fingerprint(made_with) == manifest.get("tokenizer_fingerprint"))
    other = f"pass --tokenizer-dir {made_with} (the tokenizer they were made with), or " if still_there else ""
    return (f"{Path(chunks_dir) / 'manifest.json'} was made with another tokenizer than {tokenizer_dir} (fingerprint "
            f"mismatch): {other}re-run `{PREPROCESS} --tokenizer-dir {tokenizer_dir} --output-dir {chunks_dir} "
            f"--context-length {manifest['context_length']} --force` to chunk the data with this one (or pass "
            f"--chunks-dir with chunks made with it)")


def chunks_fingerprint(manifest):
    """The chunk set's content, not when it was made ("seconds"): chunks rebuilt alike (make all after another
    SCALE) still resume their checkpoints."""
    content = json.dumps({k: v for k, v in manifest.items() if k != "seconds"}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def load_splits(chunks_dir, manifest, context_length, vocab_size, batch_size, world_size):
    """(train rows, val rows): ChunkRows readers of context_length + 1 tokens per row, read from disk as batches need
    them; at least one micro batch on each rank of training rows and one val row."""
    if context_length > manifest["context_length"]:
        raise UserError(f"--context-length {context_length} is larger than the chunks' context_length "
                        f"{manifest['context_length']} in {chunks_dir}: re-run preprocessing with "
                        f"--context-length {context_length} or pass a smaller --context-length")
    train_rows = chunk_rows(chunks_dir, manifest, "train", context_length, vocab_size)
    val_rows = chunk_rows(chunks_dir, manifest, "val", context_length, vocab_size)
    if len(val_rows) == 0:
        raise UserError(f"{chunks_dir}: the val split has no rows: re-run preprocessing with a val split")
    if len(train_rows) < batch_size * world_size:
        raise UserError(f"{chunks_dir}: only {len(train_rows)} training rows, fewer than one batch "
                        f"({batch_size} x {world_size} ranks): use more data or a smaller --batch-size")
    return train_rows, val_rows


class Batches:
    """Rows for (step, micro step, rank): a seeded permutation of all rows per epoch, ranks take disjoint slices.
    A pure function of (seed, step, micro, rank), so a resumed run sees exactly the same data, and any split of a
    step's rows into micro batches and ranks takes the same rows."""

    def __init__(self, rows, batch_size, grad_accum, rank, world_size, seed):
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows_per_step = batch_size * grad_accum * world_size
        self._perm_epoch, self._perm = None, None

    def _perm_for(self, epoch):
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def get(self, step, micro):
        start = step * self.rows_per_step + (micro * self.world_size + self.rank) * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        n = len(self.rows)
        index = np.array([self._perm_for(p // n)[p % n] for p in positions]) if (positions // n).min() != (
            positions // n).max() else self._perm_for(positions[0] // n)[positions % n]
        batch = torch.from_numpy(self.rows[index].astype(np.int64))
        return batch[:, :-1], batch[:, 1:]


def val_row_indices(n_rows, eval_rows):
    """The val rows a validation reads: eval_rows of them at even spacing over the split (every row when it has
    fewer). The same rows at any batch size and number of ranks, so runs compare; and spread, because the split holds
    its documents in stream order (on the default corpus its first 160 rows are mostly chats: a loss a third lower)."""
    if n_rows <= eval_rows:
        return np.arange(n_rows)
    return np.linspace(0, n_rows - 1, eval_rows).round().astype(np.int64)  # spacing >= 1: no row twice
