"""Convert SmolLM3-3B into every variant we publish, in one run, and optionally upload them.

    python convert/publish_variants.py OUT_DIR [--source REPO_OR_FOLDER] [--revision REV]
        [--only NAME ...] [--upload-org ORG] [--force]

Each variant is written to OUT_DIR/<source name>-<variant> (SmolLM3-3B-4bit, SmolLM3-3B-8bit) by
`smollm3_mlx.convert.convert`, and with --upload-org pushed to ORG/<that name>. A hub source is
downloaded once: the later variants find it in the huggingface_hub cache. Stops at the first
variant that fails, with its one-line error; the variants done so far stay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smollm3_mlx.convert import ConvertError, convert
from smollm3_mlx.hub import DEFAULT_REPO

# name -> convert() arguments; "4bit" is what `smollm3-mlx chat` makes on first use
VARIANTS = {
    "4bit": dict(bits=4, recipe="mixed"),
    "8bit": dict(bits=8, recipe="uniform"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", default=DEFAULT_REPO, help="hub repo id or local folder")
    parser.add_argument("--revision", help="hub revision of the source")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--upload-org", help="push each variant to ORG/<name>")
    parser.add_argument("--force", action="store_true", help="replace existing folders")
    args = parser.parse_args(argv)

    base = Path(args.source.rstrip("/")).name
    rows = []
    for variant in args.only:
        name = f"{base}-{variant}"
        print(f"converting {name}", flush=True)
        try:
            r = convert(
                args.source,
                args.out_dir / name,
                revision=args.revision,
                upload_repo=f"{args.upload_org}/{name}" if args.upload_org else None,
                force=args.force,
                **VARIANTS[variant],
            )
        except ConvertError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
        rows.append(
            f"| {name} | {r.recipe} | {r.bits_per_weight:.2f} | {r.size_bytes / 1e6:,.0f} "
            f"| {r.seconds:.1f} | {r.upload_repo or '-'} |"
        )
    print("\n| variant | recipe | bits per weight | size (MB) | time (s) | uploaded to |")
    print("|---|---|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
