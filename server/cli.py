"""The `subspec` command: `subspec serve ...` (the HTTP server) and `subspec generate ...` (one prompt)."""

from __future__ import annotations

import argparse

from server.generate_cmd import add_generate_arguments, run_generate
from server.serve import add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subspec", description="SubSpec: LLMs larger than GPU memory, "
                                     "streamed weight offload + lossless substitute speculative decoding.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                description="Run the OpenAI-compatible HTTP server.")
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)
    generate = commands.add_parser("generate", help="generate a completion for one prompt",
                                   description="Generate a completion for one prompt.")
    add_generate_arguments(generate)
    generate.set_defaults(run=run_generate)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)
