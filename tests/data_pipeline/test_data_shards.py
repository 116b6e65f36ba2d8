"""Shard building: counts, round trip text -> shards -> loader -> text, packing modes, resume, CLI."""
import hashlib
import json
import math
import subprocess
import sys

import pytest
import sentencepiece as spm
from data_pipeline_testlib import (
    CORPUS_DOCS,
    REPO_ROOT,
    SAMPLES_PER_SHARD,
    SEQ_LEN,
    VAL_EVERY,
    build,
    make_loader,
    read_all_samples,
    rows_of,
    write_corpus,
)

pytestmark = pytest.mark.timeout(120)


def expected_streams(tokenizer_path):
    """Token streams (each document + EOS) of the two splits, from sentencepiece directly."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    streams, docs = {"train": [], "val": []}, {"train": [], "val": []}
    for d, text in enumerate(CORPUS_DOCS):
        split = "val" if d % VAL_EVERY == 0 else "train"
        streams[split] += sp.encode(text) + [sp.eos_id()]
        docs[split].append(text)
    return streams, docs, sp


def test_manifest_matches_independent_tokenization(dataset, tokenizer_path):
    streams, docs, _ = expected_streams(tokenizer_path)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == SEQ_LEN
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["documents"] == len(docs[split])
        assert entry["tokens"] == len(streams[split])
        assert entry["samples"] == math.ceil(len(streams[split]) / SEQ_LEN)
        sizes = [s["samples"] for s in entry["shards"]]
        assert sum(sizes) == entry["samples"] and all(n == SAMPLES_PER_SHARD for n in sizes[:-1])
        for shard in entry["shards"]:
            blob = (dataset / shard["name"]).read_bytes()
            assert len(blob) == shard["bytes"] and hashlib.sha256(blob).hexdigest() == shard["sha256"]
    assert manifest["report"]["bad_documents"] == 0 and manifest["report"]["bad_files"] == []


def test_webdataset_reads_the_packed_stream(dataset, tokenizer_path):
    streams, _, _ = expected_streams(tokenizer_path)
    for split in ("train", "val"):
        samples = read_all_samples(dataset, split)
        assert all(len(s) == SEQ_LEN for s in samples[:-1]) and 0 < len(samples[-1]) <= SEQ_LEN
        assert [t for s in samples for t in s] == streams[split]


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_text_to_loader_to_text(dataset, tokenizer_path, split):
    streams, docs, sp = expected_streams(tokenizer_path)
    # in order (no shuffle), one row per micro-batch so nothing is dropped; two workers interleave batches
    loader = make_loader(dataset, split=split, micro_batch_size=1, shuffle=False)
    tokens = [t for batch in loader for row in rows_of(batch) for t in row]
    assert tokens == streams[split]
    texts, current = [], []
    for t in tokens:
        if t == sp.eos_id():
            texts.append(sp.decode(current))
            current = []
        else:
            current.append(t)
    assert texts == docs[split]


def test_padded_packing_one_document_per_sample(corpus, tokenizer_path, tmp_path):
    manifest = build(corpus[:1], tmp_path / "padded", tokenizer_path, packing="padded", val_fraction=0)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    expected = []
    for text in CORPUS_DOCS[:70]:  # the documents of 00.txt
        ids = sp.encode(text) + [sp.eos_id()]
        expected += [tuple(ids[i:i + SEQ_LEN]) for i in range(0, len(ids), SEQ_LEN)]
    assert read_all_samples(tmp_path / "padded", "train") == expected
    assert manifest["splits"]["val"]["samples"] == 0
    loader = make_loader(tmp_path / "padded", micro_batch_size=1, shuffle=False, num_workers=0)
    batches = list(loader)
    assert [rows_of(b)[0] for b in batches] == expected
    short = next(b for b in batches if b["loss_mask"].sum() < SEQ_LEN)
    n = int(short["loss_mask"].sum())
    assert (short["targets"][0, n:] == sp.pad_id()).all()
    assert (short["input_ids"][0, n:] == sp.pad_id()).all()  # padding is never masked


def test_uint32_when_the_vocab_does_not_fit_16_bits():
    from data_pipeline.shard_io import token_dtype
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


@pytest.mark.parametrize("crash_at", [97, 200, 301])
def test_resume_after_a_crash_gives_identical_shards(corpus, tokenizer_path, tmp_path, monkeypatch, crash_at):
    import data_pipeline.build as build_mod
    monkeypatch.setattr(build_mod, "CHUNK_DOCS", 16)  # checkpoints happen at chunk boundaries
    reference = build(corpus, tmp_path / "ref", tokenizer_path, samples_per_shard=5, num_procs=1)

    encoded = []
    original_encode = build_mod.encode_chunk
    monkeypatch.setattr(build_mod, "encode_chunk",
                        lambda items: encoded.append(len(items)) or original_encode(items))
    calls = {"n": 0}
    original_add = build_mod.ShardWriter.add

    def crashing_add(self, tokens):
        calls["n"] += 1
        if calls["n"] == crash_at:  # mid-shard, some samples after the last checkpoint
            raise KeyboardInterrupt("simulated crash")
        return original_add(self, tokens)

    monkeypatch.setattr(build_mod.ShardWriter, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        build(corpus, tmp_path / "resumed", tokenizer_path, samples_per_shard=5, num_procs=1)
    out = tmp_path / "resumed"
    assert (out / "build_state.json").exists() and not (out / "manifest.json").exists()
    assert list(out.glob("*.partial"))
    docs_done = json.loads((out / "build_state.json").read_text())["cursor"][2]
    assert docs_done > 20
    monkeypatch.setattr(build_mod.ShardWriter, "add", original_add)
    encoded.clear()
    resumed = build(corpus, out, tokenizer_path, samples_per_shard=5, num_procs=1)
    assert sum(encoded) == len(CORPUS_DOCS) - docs_done  # checkpointed documents are not tokenized again
    for split in ("train", "val"):
        assert resumed["splits"][split] == reference["splits"][split]
    assert not (out / "build_state.json").exists() and not list(out.glob("*.partial"))


def test_rebuild_is_a_no_op_and_other_options_need_overwrite(corpus, tokenizer_path, tmp_path):
    from data_pipeline.manifest import ManifestError
    first = build(corpus[:2], tmp_path / "d", tokenizer_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").glob("*.tar")}
    assert build(corpus[:2], tmp_path / "d", tokenizer_path) == first
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").glob("*.tar")}
    with pytest.raises(ManifestError, match="overwrite"):
        build(corpus[:2], tmp_path / "d", tokenizer_path, samples_per_shard=7)
    second = build(corpus[:2], tmp_path / "d", tokenizer_path, samples_per_shard=7, overwrite=True)
    assert all(s["samples"] <= 7 for s in second["splits"]["train"]["shards"])


def test_cli_tokenizer_build_verify_inspect(tmp_path):
    corpus = write_corpus(tmp_path / "raw")
    env_cmd = [sys.executable, "-m", "data_pipeline.shards"]

    def run(*args):
        return subprocess.run(env_cmd + list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                              check=False)

    r = run("tokenizer", "--input", str(tmp_path / "raw" / "*.txt*"), "--input", str(corpus[2]),
            "--vocab-size", "360", "--model-type", "unigram", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    assert "vocab_size=360" in r.stdout
    r = run("build", "--input", str(tmp_path / "raw" / "*"), "--tokenizer", str(tmp_path / "tok.model"),
            "--seq-len", "48", "--out", str(tmp_path / "ds"), "--samples-per-shard", "20", "--num-procs", "2",
            "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["seq_len"] == 48
    assert manifest["splits"]["val"]["documents"] == 3  # default --val-fraction 0.01: documents 0, 100, 200
    r = run("verify", str(tmp_path / "ds"))
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    r = run("inspect", str(tmp_path / "ds"), "--split", "val")
    assert r.returncode == 0 and "Document 0:" in r.stdout, r.stdout + r.stderr
    r = run("build", "--input", str(tmp_path / "nothing" / "*.txt"), "--tokenizer",
            str(tmp_path / "tok.model"), "--seq-len", "48", "--out", str(tmp_path / "ds2"))
    assert r.returncode == 1 and "nothing" in r.stderr


def test_default_corpus_is_deterministic_and_cached(tmp_path):
    from data_pipeline.corpus import build_default_dataset, write_default_corpus
    files = write_default_corpus(tmp_path / "a", max_bytes=60_000)
    again = write_default_corpus(tmp_path / "b", max_bytes=60_000)
    text = b"".join(f.read_bytes() for f in files)
    assert text == b"".join(f.read_bytes() for f in again)
    assert 50_000 < len(text) <= 60_000 and text.count(b"\n\n") > 50
    text.decode("utf-8")
    dataset = build_default_dataset(tmp_path / "cache", seq_len=SEQ_LEN, vocab_size=400, max_bytes=60_000,
                                    num_procs=1, progress=False)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 100 and manifest["splits"]["val"]["samples"] > 0
    stamp = (dataset / "manifest.json").stat().st_mtime_ns
    assert build_default_dataset(tmp_path / "cache", seq_len=SEQ_LEN, vocab_size=400, max_bytes=60_000,
                                 progress=False) == dataset
    assert (dataset / "manifest.json").stat().st_mtime_ns == stamp
