"""``smoledge pull REPO_ID [--revision R]``: a pre-built bundle from the Hub, verified (smoledge.hub)."""

from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo holding a bundle (owner/name)")
    parser.add_argument("--revision", help="branch, tag or commit (default main)")


def main(args: argparse.Namespace) -> int:
    from smoledge.hub import pull

    print(pull(args.repo_id, args.revision))
    return 0
