"""The ``moefx`` command line.

Exit codes: 0 success, 2 bad input (a one-line message says what and how to fix it), 1 an internal error
(the traceback is shown with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from moefx.errors import MoefxError


def _demo(args: argparse.Namespace) -> None:
    """Capture the built-in tiny Mixtral-style model, detect its MoE blocks and print the report."""
    from moefx.capture import trace
    from moefx.passes.detect import find_moe_blocks
    from moefx.zoo import example_inputs, tiny_model

    model, inputs = tiny_model(args.family), example_inputs(args.family)
    start = time.perf_counter()
    graph = trace(model, inputs)
    captured = time.perf_counter()
    blocks = find_moe_blocks(model, inputs, graph_module=graph)
    detected = time.perf_counter()
    size = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__} (built-in, random weights), {size:,} parameters")
    print(
        f"captured {len(graph.graph.nodes)} graph nodes in {captured - start:.1f} s; "
        f"found {len(blocks)} MoE blocks in {detected - captured:.1f} s\n"
    )
    print(_block_table(blocks))


def _block_table(blocks: list) -> str:
    columns = ["name", "num_experts", "top_k", "scoring", "normalize", "experts", "gated", "bias",
               "hidden", "intermediate", "shared_experts"]  # fmt: skip
    rows = [[str(b.summary()[c]) for c in columns] for b in blocks]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def build_parser() -> argparse.ArgumentParser:
    from moefx.zoo import FAMILIES

    parser = argparse.ArgumentParser(prog="moefx", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors (default: off)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the end-to-end demo on a built-in model")
    demo.add_argument("--family", choices=FAMILIES, default="mixtral",
                      help="which built-in tiny model family to use (default: mixtral)")  # fmt: skip
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MoefxError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"moefx: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal error: say so in one line unless asked for the traceback
        if args.debug:
            raise
        print(f"moefx: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
