"""The `subspec` command: `subspec serve ...` (the HTTP server), `subspec generate ...` (one prompt),
`subspec prepare ...` (fetch and convert the model once) and `subspec plan ...` (the memory plan, offline)."""

from __future__ import annotations

import argparse

from server.engine_args import add_engine_arguments
from server.generate_cmd import add_generate_arguments, run_generate
from server.plan_cmd import add_plan_arguments, run_plan
from server.prepare_cmd import run_prepare
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
    prepare = commands.add_parser("prepare", help="fetch the model and convert a GGUF file once, into the cache",
                                  description="Fetch the model and convert a GGUF file once, into the cache "
                                  "(SUBSPEC_CACHE_DIR), so that later starts read the conversion.")
    add_engine_arguments(prepare)
    prepare.set_defaults(run=run_prepare)
    plan = commands.add_parser("plan", help="print the memory plan of a config, without a GPU or weights",
                               description="Print the memory plan a GPU start would make for a config, without a "
                               "GPU and without weights: the model's shape is read offline.")
    add_plan_arguments(plan)
    plan.set_defaults(run=run_plan)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)
