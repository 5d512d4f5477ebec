"""`python -m pipeline.config --markdown`: print the README's configuration tables.

`--write README.md` puts them between that file's markers instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config.doc import markdown, with_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the configuration tables")
    group.add_argument("--write", type=Path, metavar="README", help="rewrite the tables between the file's markers")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    else:
        args.write.write_text(with_tables(args.write.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
