"""A sentencepiece tokenizer with the special tokens a masked-diffusion LM needs.

Ids 0..3 are <unk>, <s> (BOS), </s> (EOS), <pad>; [MASK] is a control symbol (id 4 for models trained
here), so no input text can ever produce it, and "\n" is a piece of its own so documents keep their
layout. Training uses identity normalisation, no whitespace folding and byte fallback: decode(encode(s))
== s for any string. A foreign .model without [MASK] still loads: [MASK] is then appended after its last
piece. `vocab_size` always counts [MASK]; the model config takes vocab_size and mask_token_id from here.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

MASK_PIECE = "[MASK]"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
MAX_TRAIN_LINE_BYTES = 4096  # sentencepiece drops longer training sentences; we cut lines to fit


class Tokenizer:
    def __init__(self, model_bytes: bytes, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        n = self.sp.get_piece_size()
        mask = self.sp.piece_to_id(MASK_PIECE)
        has_mask = mask != self.unk_id and self.sp.is_control(mask)
        self.mask_id = mask if has_mask else n  # appended after the last piece for foreign models
        self.vocab_size = n if has_mask else n + 1
        if self.pad_id < 0:  # models without <pad> pad with EOS; padding is never scored anyway
            self.pad_id = self.eos_id if self.eos_id >= 0 else self.unk_id

    # ------------------------------------------------------------------ loading / training
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no sentencepiece model at {path}")
        try:
            return cls(path.read_bytes(), path)
        except RuntimeError as e:
            raise ValueError(f"tokenizer: {path} is not a valid sentencepiece model ({e})") from None

    @classmethod
    def train(cls, files: Iterable[str | Path], out_prefix: str | Path, vocab_size: int,
              model_type: str = "bpe", *, character_coverage: float = 0.9995, byte_fallback: bool = True,
              max_sentences: int = 2_000_000, num_threads: int | None = None, text_field: str = "text",
              strict: bool = False) -> Tokenizer:
        """Train on text / JSONL / .gz files and write {out_prefix}.model and .vocab; returns the tokenizer.

        Sentences are the non-empty lines of each document (a uniform sample of at most max_sentences).
        """
        from data_pipeline.sources import expand_inputs, iter_documents  # local: sources imports nothing here

        if model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type: must be one of {MODEL_TYPES}, got {model_type!r}")
        paths = expand_inputs([str(f) for f in files], strict=strict)

        def sentences() -> Iterator[str]:
            for doc in iter_documents(paths, text_field=text_field, strict=strict):
                for line in doc.splitlines():
                    if line.strip():
                        yield line.encode("utf-8")[:MAX_TRAIN_LINE_BYTES].decode("utf-8", "ignore")

        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = out_prefix.with_name(out_prefix.name + f".tmp{os.getpid()}")
        spm.set_random_generator_seed(0)  # the sentence sample, hence the model, is reproducible
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_prefix=str(tmp_prefix), vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage, byte_fallback=byte_fallback,
                unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                control_symbols=[MASK_PIECE], user_defined_symbols=["\n"],
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=True,
                max_sentence_length=MAX_TRAIN_LINE_BYTES * 2,
                input_sentence_size=max_sentences, shuffle_input_sentence=True,
                hard_vocab_limit=True, num_threads=num_threads or min(16, os.cpu_count() or 1),
                minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"tokenizer: training failed for vocab_size={vocab_size}: {e}") from None
        for ext in (".model", ".vocab"):  # publish atomically: a crash never leaves a half-written model
            os.replace(f"{tmp_prefix}{ext}", f"{out_prefix}{ext}")
        return cls.load(f"{out_prefix}.model")

    # ------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special tokens ([MASK], BOS, EOS, PAD) produce no text."""
        n = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path}, vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
                f"sha256={self.sha256[:12]})")
