"""``smoledge push BUNDLE REPO_ID``: upload a bundle to the Hub (smoledge.hub; needs HF_TOKEN with write access)."""

from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder or .zip")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo to upload to (owner/name; created if absent)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--branch", help="branch to commit to (default main)")
    parser.add_argument("--message", help="commit message")


def main(args: argparse.Namespace) -> int:
    from smoledge.hub import push

    print(push(args.bundle, args.repo_id, private=args.private, branch=args.branch, message=args.message))
    return 0
