"""The `mirror` command: parses arguments and calls library functions."""
from __future__ import annotations

import argparse
import sys

from mirror_core.config import ALIGNMENT_MODES


def cmd_import_official(args: argparse.Namespace) -> int:
    from mirror_core.bundle import describe_model
    from mirror_core.official import import_official_bundle

    model_id, report = import_official_bundle(
        args.checkpoint,
        args.backbone,
        args.out,
        memory=args.memory,
        alignment=args.alignment,
        lora_alpha=args.lora_alpha,
        memory_heads=args.memory_heads,
        top_k=args.top_k,
    )
    for line in describe_model(report.config, report.weights) + report.notes:
        print(line)
    print(f"bundle: {args.out} (model_id {model_id})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="MIRROR AI-generated image detection at scale")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-official", help="convert official .pth weights into a model bundle (safely)")
    p.add_argument("--checkpoint", required=True, help="official Phase 2 checkpoint-*.pth")
    p.add_argument("--memory", help="official Phase 1 mirror_phase1*.pth (optional when the checkpoint has memory_bank.*)")
    p.add_argument("--backbone", required=True, help="DINOv3 / DINOv2 directory (config.json)")
    p.add_argument("--out", required=True, help="bundle directory or URI (s3://...)")
    p.add_argument("--alignment", choices=ALIGNMENT_MODES, default="by-extension",
                   help="JPEG q96 format alignment recorded in the bundle (default: official by-extension)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: checkpoint args, else 2 x rank = official 16)")
    p.add_argument("--memory-heads", type=int, help="memory-bank heads (default: memory_config, else 8)")
    p.add_argument("--top-k", type=int, help="memory-bank top_k (default: memory_config, else 128)")
    p.set_defaults(func=cmd_import_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"mirror {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
