"""`dshards`: build tokenized shard datasets (also `python -m data_pipeline.shards`).

    dshards tokenizer --input 'raw/*.jsonl.gz' --vocab-size 32768 --out tok/spm32k
    dshards build --input 'raw/*.jsonl.gz' --tokenizer tok/spm32k.model --seq-len 2048 --out data/web
    dshards default-corpus --out data/default            # built-in corpus + tokenizer + shards
    dshards verify data/web                               # checksums and sample counts
    dshards inspect data/web --split val -n 2             # summary + decoded samples
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.build import PACKING_MODES, build_shards
from data_pipeline.corpus import build_default_dataset
from data_pipeline.manifest import MANIFEST_NAME, SPLITS, ManifestError, load_manifest
from data_pipeline.shard_io import ShardCorrupt, ShardReader, file_sha256
from data_pipeline.sources import TXT_DOC_MODES, BadInputError
from data_pipeline.tokenizer import MODEL_TYPES, Tokenizer

__all__ = ["build_default_dataset", "build_shards", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dshards", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add_input_args(s):
        s.add_argument("--input", action="append", required=True,
                       help="glob or file of .txt / .jsonl (/.gz); repeatable; quote globs")
        s.add_argument("--text-field", default="text", help="JSONL field holding the document text")
        s.add_argument("--strict", action="store_true",
                       help="fail on the first bad input instead of skipping and counting it")

    t = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer ([MASK], BOS/EOS, PAD included)")
    add_input_args(t)
    t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, [MASK] included")
    t.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    t.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    t.add_argument("--character-coverage", type=float, default=0.9995)

    b = sub.add_parser("build", help="tokenize, pack and write train/val shards + manifest.json")
    add_input_args(b)
    b.add_argument("--out", required=True, help="dataset folder")
    b.add_argument("--tokenizer", help="sentencepiece .model (default: train one, see --vocab-size)")
    b.add_argument("--vocab-size", type=int, help="train a tokenizer of this size into OUT first")
    b.add_argument("--seq-len", type=int, required=True)
    b.add_argument("--packing", choices=PACKING_MODES, default="packed",
                   help="packed: documents joined with EOS, cut to seq_len; padded: one document per sample")
    b.add_argument("--val-fraction", type=float, default=0.01,
                   help="every round(1/f)-th document is held out")
    b.add_argument("--samples-per-shard", type=int, default=8192)
    b.add_argument("--num-procs", type=int, default=None, help="tokenizer processes (default: all cores)")
    b.add_argument("--txt-docs", choices=TXT_DOC_MODES, default="paragraph",
                   help="text files: documents separated by blank lines / one per line / one per file")
    b.add_argument("--overwrite", action="store_true", help="replace a dataset built with other options")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    d = sub.add_parser("default-corpus", help="the built-in corpus (stdlib docs): text, tokenizer and shards")
    d.add_argument("--out", required=True)
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--vocab-size", type=int, default=4096)
    d.add_argument("--max-mb", type=float, default=None, help="cap the corpus size")
    d.add_argument("--num-procs", type=int, default=None)

    v = sub.add_parser("verify", help="check every shard's checksum, metadata and sample count")
    v.add_argument("dataset")

    i = sub.add_parser("inspect", help="print the manifest summary and a few decoded samples")
    i.add_argument("dataset")
    i.add_argument("--split", default="train", choices=SPLITS)
    i.add_argument("-n", type=int, default=1, help="samples to decode")
    return p


def _summary(manifest: dict) -> str:
    tok = manifest["tokenizer"]
    lines = [f"seq_len={manifest['seq_len']} packing={manifest['packing']} dtype={manifest['dtype']} "
             + f"vocab_size={tok['vocab_size']} tokenizer sha256={tok['sha256'][:12]}"]
    for split, e in manifest["splits"].items():
        lines.append(f"  {split:5s}: {len(e['shards'])} shards, {e['samples']} samples, "
                     f"{e['tokens']} tokens, {e['documents']} documents")
    r = manifest["report"]
    lines.append(f"  skipped: {len(r['bad_files'])} bad file(s), {r['bad_documents']} bad document(s), "
                 f"{r['empty_documents']} empty")
    lines += [f"    {x}" for x in (r["bad_files"] + r["examples"])[:10]]
    return "\n".join(lines)


def _verify(dataset: Path) -> int:
    manifest = load_manifest(dataset)
    expect = {"tokenizer_sha256": manifest["tokenizer"]["sha256"], "dtype": manifest["dtype"],
              "seq_len": manifest["seq_len"]}
    vocab, bad = manifest["tokenizer"]["vocab_size"], 0
    tok_file = dataset / manifest["tokenizer"]["file"]
    if not tok_file.exists() or file_sha256(tok_file) != manifest["tokenizer"]["sha256"]:
        print(f"BAD {tok_file}: missing or sha256 differs from the manifest")
        bad += 1
    for e in manifest["splits"].values():
        for entry in e["shards"]:
            path = dataset / entry["name"]
            try:
                if not path.exists():
                    raise ShardCorrupt(f"shard {path}: missing")
                reader = ShardReader(path, entry, expect, verify_checksum=True)
                for j in range(entry["samples"]):
                    reader.read(j, vocab)
                reader.close()
            except ShardCorrupt as err:
                print(f"BAD {err}")
                bad += 1
    print(f"{dataset}: {'OK' if not bad else f'{bad} problem(s)'}")
    return 1 if bad else 0


def _inspect(dataset: Path, split: str, n: int) -> None:
    manifest = load_manifest(dataset)
    print(_summary(manifest))
    tok = Tokenizer.load(dataset / manifest["tokenizer"]["file"])
    expect = {"tokenizer_sha256": tok.sha256, "dtype": manifest["dtype"], "seq_len": manifest["seq_len"]}
    shards = manifest["splits"][split]["shards"]
    if shards:
        reader = ShardReader(dataset / shards[0]["name"], shards[0], expect)
        for j in range(min(n, shards[0]["samples"])):
            text = tok.decode(reader.read(j, tok.vocab_size).tolist())
            print(f"--- {shards[0]['name']} sample {j}:\n{text!r}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tokenizer":
            tok = Tokenizer.train(args.input, args.out, args.vocab_size, args.model_type,
                                  character_coverage=args.character_coverage,
                                  max_sentences=args.max_sentences, text_field=args.text_field,
                                  strict=args.strict)
            print(tok)
        elif args.command == "build":
            tokenizer = args.tokenizer
            if tokenizer is None:
                if args.vocab_size is None:
                    raise SystemExit("dshards build: pass --tokenizer T.model, "
                                     "or --vocab-size N to train one")
                prefix = Path(args.out).parent / f"{Path(args.out).name}_tokenizer_v{args.vocab_size}"
                tokenizer = f"{prefix}.model"
                if not Path(tokenizer).exists():
                    print(Tokenizer.train(args.input, prefix, args.vocab_size, text_field=args.text_field,
                                          strict=args.strict))
            manifest = build_shards(args.input, args.out, tokenizer, args.seq_len, packing=args.packing,
                                    val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                                    num_procs=args.num_procs, text_field=args.text_field,
                                    txt_docs=args.txt_docs, strict=args.strict, overwrite=args.overwrite,
                                    progress=not args.quiet)
            print(f"{Path(args.out) / MANIFEST_NAME}\n{_summary(manifest)}")
        elif args.command == "default-corpus":
            max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
            path = build_default_dataset(args.out, args.seq_len, args.vocab_size, max_bytes=max_bytes,
                                         num_procs=args.num_procs)
            print(f"{path / MANIFEST_NAME}\n{_summary(json.loads((path / MANIFEST_NAME).read_text()))}")
        elif args.command == "verify":
            return _verify(Path(args.dataset))
        elif args.command == "inspect":
            _inspect(Path(args.dataset), args.split, args.n)
    except (BadInputError, ManifestError, ShardCorrupt, ValueError, FileNotFoundError) as e:
        print(f"dshards {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
