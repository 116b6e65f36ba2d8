"""DataConfig validation and the tokenizer's special tokens."""
import hashlib

import pytest
import sentencepiece as spm
from data_pipeline_testlib import VOCAB

from data_pipeline.config import DataConfig
from data_pipeline.tokenizer import Tokenizer
from model.config import ConfigError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("field, value", [
    ("path", ""), ("seq_len", 1), ("seq_len", 2.5), ("num_workers", -1), ("shuffle_buffer", 0),
    ("epochs", 0), ("eps", 0.0), ("eps", 1.0), ("max_bad_samples", -1), ("prefetch_factor", 0),
    ("tokenizer", "tok.vocab"), ("worker_timeout_s", -1), ("shuffle", "yes"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"data\.{field}:"):
        DataConfig(**{"path": "d", field: value})


def test_dict_round_trip_and_unknown_keys():
    cfg = DataConfig(path="data/x", seq_len=64, epochs=3, max_bad_samples=5)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['shuffel', 'sq_len'\]"):
        DataConfig.from_dict({"path": "x", "sq_len": 3, "shuffel": True})
    assert str(cfg.tokenizer_path) == "data/x/tokenizer.model"
    assert str(cfg.replace(tokenizer="t.model").tokenizer_path) == "t.model"


def test_special_tokens_and_lossless_round_trip(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (1, 2, 3, 4)
    assert tok.vocab_size == VOCAB  # [MASK] included
    assert tok.sha256 == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    assert sp.id_to_piece(tok.mask_id) == "[MASK]" and sp.is_control(tok.mask_id)
    text = "Spaces  kept,\n\ttabs too; [MASK] is plain text here; unseen: ∑ 😀 Ωμέγα"
    ids = tok.encode(text)
    assert tok.mask_id not in ids and tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.mask_id, tok.pad_id]) == text


def test_foreign_model_without_mask_gets_one_appended(corpus, tmp_path):
    spm.SentencePieceTrainer.train(input=str(corpus[0]), model_prefix=str(tmp_path / "plain"), vocab_size=100,
                                   minloglevel=2)
    tok = Tokenizer.load(tmp_path / "plain.model")
    assert tok.mask_id == 100 and tok.vocab_size == 101 and tok.pad_id == tok.eos_id
    assert tok.decode(tok.encode("the model") + [tok.mask_id]) == "the model"


def test_unigram_and_clear_errors(corpus, tmp_path):
    tok = Tokenizer.train(corpus, tmp_path / "uni", 350, model_type="unigram", num_threads=1)
    assert tok.vocab_size == 350
    assert tok.decode(tok.encode("Document 3: the café")) == "Document 3: the café"
    with pytest.raises(ValueError, match="vocab_size=100"):  # byte fallback alone needs 256 pieces
        Tokenizer.train(corpus, tmp_path / "tiny", 100, num_threads=1)
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(corpus, tmp_path / "x", 300, model_type="wordpiece")
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        Tokenizer.load(tmp_path / "missing.model")
