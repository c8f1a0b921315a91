"""`loraledger model init-tiny DIR`: write the small random Llama checkpoint + trained tokenizer (offline).
`loraledger model import GGUF_FILE --out DIR`: a GGUF model file -> a safetensors checkpoint with provenance."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("model", help="base models: create the tiny offline default, import a GGUF file")
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init-tiny", help="write a random Llama-family checkpoint and a byte-level BPE tokenizer to DIR"
    )
    init.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    init.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    init.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    init.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    init.add_argument("--kv-heads", type=int, default=2, help="key/value heads, divides --heads (default 2)")
    init.add_argument("--intermediate", type=int, default=128, help="MLP width (default 128)")
    init.add_argument("--vocab", type=int, default=512, help="vocabulary size, at least 262 (default 512)")
    init.add_argument("--max-positions", type=int, default=512, help="context length (default 512)")
    init.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    init.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DIR")
    init.set_defaults(handler=_init_tiny)

    imp = sub.add_parser(
        "import",
        help="convert a GGUF model file (llama.cpp, Ollama) into a safetensors checkpoint the node serves",
    )
    imp.add_argument("gguf_file", metavar="GGUF_FILE", help="the .gguf file (Llama architecture)")
    imp.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    imp.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="dtype of the written weights (default float32)",
    )
    imp.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DIR")
    imp.set_defaults(handler=_import_gguf)


def _init_tiny(args: argparse.Namespace) -> int:
    from loraledger.inference.tiny import init_tiny

    out = init_tiny(
        args.dir,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        max_positions=args.max_positions,
        seed=args.seed,
        overwrite=args.force,
    )
    print(f"wrote tiny model to {out}")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from loraledger.inference.gguf_import import PROVENANCE_FILE, import_gguf

    result = import_gguf(args.gguf_file, args.out, dtype=args.dtype, overwrite=args.force)
    gguf = result.provenance["gguf"]
    print(f"imported {result.provenance['source']['file']} ({gguf['architecture']}, {gguf['file_type']}) "
          f"to {result.out_dir} as {args.dtype}")
    print(f"base model hash {result.base_model_hash}; provenance in {result.out_dir / PROVENANCE_FILE}")
    return 0
