"""Bad input at build time (skip-and-count, or strict) and at read time (clear error naming the shard, or
skip-and-count under data.max_bad_samples). Every test runs under a timeout: nothing may hang."""
import gzip
import json

import pytest
from data_pipeline_testlib import SEQ_LEN, VAL_EVERY, build, make_loader, rows_of

from data_pipeline.manifest import ManifestError
from data_pipeline.sources import BadInputError
from data_pipeline.stream import BadDataError

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------- build time
def write(path, blob: bytes):
    path.write_bytes(blob)
    return path


def test_invalid_utf8_is_skipped_and_counted_or_fails_strict(tokenizer_path, tmp_path):
    src = write(tmp_path / "a.txt", b"good document one\n\nbad \xff\xfe document\nsecond line\n\ngood two\n")
    manifest = build([src], tmp_path / "out", tokenizer_path, val_fraction=0)
    report = manifest["report"]
    assert report["bad_documents"] == 1 and manifest["splits"]["train"]["documents"] == 2
    assert f"{src}:3: invalid UTF-8" in report["examples"][0]
    with pytest.raises(BadInputError, match=rf"{src}:3: invalid UTF-8 at byte 4"):
        build([src], tmp_path / "strict", tokenizer_path, strict=True)


def test_bad_jsonl_lines_are_skipped_and_counted(tokenizer_path, tmp_path):
    lines = [json.dumps({"text": "fine"}), "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": "also fine"}), json.dumps({"text": ""})]
    src = write(tmp_path / "a.jsonl", "\n".join(lines).encode() + b"\n")
    manifest = build([src], tmp_path / "out", tokenizer_path, val_fraction=0)
    report = manifest["report"]
    assert (report["bad_documents"], report["empty_documents"]) == (2, 1)
    assert manifest["splits"]["train"]["documents"] == 2
    assert any("invalid JSON" in e for e in report["examples"])
    assert any("no string field 'text'" in e for e in report["examples"])


def test_missing_file_is_reported_or_fails_strict(tokenizer_path, tmp_path):
    src = write(tmp_path / "a.txt", b"one document\n")
    missing = tmp_path / "gone.txt"
    manifest = build([src, missing, tmp_path / "none*.txt"], tmp_path / "out", tokenizer_path, val_fraction=0)
    assert manifest["report"]["bad_files"] == [f"{missing}: missing file",
                                               f"{tmp_path / 'none*.txt'}: no file matches this pattern"]
    with pytest.raises(BadInputError, match=f"{missing}: missing file"):
        build([src, missing], tmp_path / "strict", tokenizer_path, strict=True)
    with pytest.raises(BadInputError, match="matched nothing"):
        build([missing], tmp_path / "none", tokenizer_path)


def test_truncated_gzip_keeps_what_was_readable(tokenizer_path, tmp_path):
    docs = [f"document number {i} " * 20 for i in range(200)]
    blob = gzip.compress("\n\n".join(docs).encode())
    src = write(tmp_path / "a.txt.gz", blob[:len(blob) // 2])
    manifest = build([src], tmp_path / "out", tokenizer_path, val_fraction=0)
    assert len(manifest["report"]["bad_files"]) == 1 and str(src) in manifest["report"]["bad_files"][0]
    assert 0 < manifest["splits"]["train"]["documents"] < 200
    with pytest.raises(BadInputError, match=f"{src}: corrupt or truncated compressed file"):
        build([src], tmp_path / "strict", tokenizer_path, strict=True)


# ------------------------------------------------------------------------------------------- read time
def manifest_of(dataset):
    return json.loads((dataset / "manifest.json").read_text())


def first_train_shard(dataset):
    entry = manifest_of(dataset)["splits"]["train"]["shards"][0]
    return dataset / entry["name"], entry


def epoch_rows(dataset, **kw):
    """One ordered epoch, one row per batch (nothing dropped); returns (loader, rows)."""
    loader = make_loader(dataset, micro_batch_size=1, shuffle=False, **kw)
    return loader, [rows_of(b)[0] for b in loader]


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_truncated_empty_or_missing_shard_is_named_or_skipped(dataset_copy, damage):
    path, entry = first_train_shard(dataset_copy)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:entry["bytes"] // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(BadDataError, match=str(path)):  # strict (default): refuses at construction
        make_loader(dataset_copy)
    loader, rows = epoch_rows(dataset_copy, max_bad_samples=entry["samples"], num_workers=2)
    assert loader.bad_samples == entry["samples"] and rows[:entry["samples"]] == [()] * entry["samples"]
    assert all(rows[entry["samples"]:])  # every other sample still arrives, in place
    assert len(rows) == manifest_of(dataset_copy)["splits"]["train"]["samples"]


def test_damage_inside_a_shard_is_caught_while_reading(dataset_copy):
    path, entry = first_train_shard(dataset_copy)
    blob = bytearray(path.read_bytes())
    header_of_sample_5 = 1024 + 1024 * 5  # after the __shard__ member: (header + one 512-byte block) each
    assert blob[header_of_sample_5:header_of_sample_5 + 10] == b"0000000005"
    blob[header_of_sample_5 + 100] ^= 0xFF  # same size, broken header checksum
    path.write_bytes(bytes(blob))
    with pytest.raises(BadDataError, match=rf"{path} sample 5: .*checksum"):
        epoch_rows(dataset_copy, num_workers=2)
    loader, rows = epoch_rows(dataset_copy, max_bad_samples=100, num_workers=2)
    lost = entry["samples"] - 5  # the rest of the shard is unreachable once a header is garbage
    assert loader.bad_samples == lost and rows[5:entry["samples"]] == [()] * lost and all(rows[:5])


def test_token_ids_beyond_the_vocab_are_bad_samples(dataset_copy):
    path, _ = first_train_shard(dataset_copy)
    blob = bytearray(path.read_bytes())
    data_of_sample_0 = 1024 + 512  # after the __shard__ member and the sample's header
    blob[data_of_sample_0:data_of_sample_0 + 2] = b"\xff\xff"
    path.write_bytes(bytes(blob))
    with pytest.raises(BadDataError, match=rf"{path} sample 0: token id 65535 >= vocab_size"):
        epoch_rows(dataset_copy, num_workers=0)
    loader, rows = epoch_rows(dataset_copy, max_bad_samples=1, num_workers=0)
    assert loader.bad_samples == 1 and rows[0] == ()


def test_shard_from_another_tokenizer(dataset_copy, corpus, tmp_path):
    from data_pipeline.tokenizer import Tokenizer
    other_tok = Tokenizer.train(corpus, tmp_path / "other", 380, model_type="bpe", num_threads=1)
    other = tmp_path / "other_ds"
    build(corpus, other, other_tok.path)
    path, entry = first_train_shard(dataset_copy)
    last_of_other = manifest_of(other)["splits"]["train"]["shards"][-1]
    assert last_of_other["bytes"] != entry["bytes"]
    # 1) a size that differs from the manifest's: refused at construction, naming the shard
    path.write_bytes((other / last_of_other["name"]).read_bytes())
    with pytest.raises(BadDataError, match=rf"{path}: .*bytes but the manifest says"):
        make_loader(dataset_copy)
    # 2) same size (packed shards of equal sample counts are): its header names the other tokenizer
    path.write_bytes((other / path.name).read_bytes())
    assert path.stat().st_size == entry["bytes"]
    with pytest.raises(BadDataError, match=rf"{path}: built with tokenizer_sha256="):
        epoch_rows(dataset_copy, num_workers=2)
    # 3) with data.verify_checksums the sha256 against the manifest catches any replaced file
    with pytest.raises(BadDataError, match=rf"{path}: sha256 differs from the manifest"):
        epoch_rows(dataset_copy, num_workers=0, verify_checksums=True)


def test_dataset_level_errors_name_the_field(dataset_copy, tmp_path, corpus):
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import MaskedBatchLoader
    with pytest.raises(ManifestError, match="data.seq_len: 64 but the dataset"):
        MaskedBatchLoader(DataConfig(path=str(dataset_copy), seq_len=64), dp_rank=0, dp_size=1,
                          micro_batch_size=2, grad_accum=1, mask_id=4, seed=0)
    with pytest.raises(ManifestError, match="data.path: no manifest.json"):
        MaskedBatchLoader(DataConfig(path=str(tmp_path), seq_len=64), dp_rank=0, dp_size=1,
                          micro_batch_size=2, grad_accum=1, mask_id=4, seed=0)
    n_train = manifest_of(dataset_copy)["splits"]["train"]["samples"]
    with pytest.raises(ManifestError, match=f"has {n_train} samples, fewer than one global micro-batch"):
        make_loader(dataset_copy, dp_size=n_train, micro_batch_size=2)
    from data_pipeline.tokenizer import Tokenizer
    other = Tokenizer.train(corpus, tmp_path / "other", 390, num_threads=1)
    with pytest.raises(ManifestError, match="data.tokenizer: .* is not the tokenizer"):
        make_loader(dataset_copy, tokenizer=str(other.path))
    (dataset_copy / "manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        make_loader(dataset_copy)
    assert SEQ_LEN == 32 and VAL_EVERY == 10
