"""Helpers of the data pipeline tests (imported by conftest.py and the test modules).

The tests know the synthetic corpus document by document (CORPUS_DOCS), so what they expect is computed
from it, independently of the code under test."""
import gzip
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
VOCAB = 400
SAMPLES_PER_SHARD = 13  # uneven shards: the last one of each split is shorter
VAL_EVERY = 10          # val_fraction = 0.1
WORD_LIST = ("the of and a to in is was for on that with as by at from it an be this are which or data model "
         "token shard masked diffusion mamba state space sequence layer scan forward reverse epoch batch "
         "sample seed worker rank resume loader stream corpus text file line byte value error report "
         "café naïve über señor 日本 東京 straße")
WORDS = WORD_LIST.split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
                 for _ in range(rng.randint(1, 4))]
        docs.append(f"Document {i}: " + "\n".join(lines))
    return docs


# The corpus files in sorted-path order (the order the build reads them), with their document counts.
CORPUS_FILES = [("00.txt", 70), ("01.txt", 50), ("02.jsonl", 60), ("03.jsonl.gz", 40), ("04.txt.gz", 30)]
CORPUS_DOCS = make_docs(sum(n for _, n in CORPUS_FILES), seed=1234)


def write_corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for name, n in CORPUS_FILES:
        docs = CORPUS_DOCS[start:start + n]
        start += n
        if ".jsonl" in name:
            blob = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
        else:
            blob = "\n\n".join(docs).encode() + b"\n"
        path = folder / name
        path.write_bytes(gzip.compress(blob, mtime=0) if name.endswith(".gz") else blob)
        paths.append(path)
    return paths


def build(corpus_paths, out: Path, tokenizer: Path, **kw) -> dict:
    from data_pipeline.build import build_shards
    opts = {"packing": "packed", "val_fraction": 1 / VAL_EVERY, "samples_per_shard": SAMPLES_PER_SHARD,
            "num_procs": 2, "progress": False}
    opts.update(kw)
    return build_shards([str(p) for p in corpus_paths], out, tokenizer, SEQ_LEN, **opts)


def data_config(path, **kw):
    from data_pipeline.config import DataConfig
    opts = {"path": str(path), "seq_len": SEQ_LEN, "num_workers": 2, "shuffle_buffer": 40, "epochs": 1}
    opts.update(kw)
    return DataConfig(**opts)


def make_loader(path, *, split="train", dp_rank=0, dp_size=1, micro_batch_size=4, grad_accum=1, seed=7,
                **cfg):
    from data_pipeline.stream import MaskedBatchLoader
    from data_pipeline.tokenizer import Tokenizer
    mask_id = Tokenizer.load(Path(path) / "tokenizer.model").mask_id
    return MaskedBatchLoader(data_config(path, **cfg), split=split, dp_rank=dp_rank, dp_size=dp_size,
                             micro_batch_size=micro_batch_size, grad_accum=grad_accum, mask_id=mask_id,
                             seed=seed)


def read_all_samples(dataset: Path, split: str) -> list[tuple[int, ...]]:
    """Every sample of a split, read with plain webdataset (independent of the loader), in shard order."""
    import numpy as np
    import webdataset as wds
    manifest = json.loads((dataset / "manifest.json").read_text())
    urls = [str(dataset / e["name"]) for e in manifest["splits"][split]["shards"]]
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out.append(tuple(np.frombuffer(sample["u16"], dtype="<u2").tolist()))
    return out


def rows_of(batch) -> list[tuple[int, ...]]:
    """The real tokens of each row (loss_mask 1); empty tuples for padding rows."""
    return [tuple(t[m > 0].tolist()) for t, m in zip(batch["targets"], batch["loss_mask"])]
