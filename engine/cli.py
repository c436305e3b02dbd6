"""The `recscore` command."""
import argparse
import sys

from . import commands as engine_commands


def main(argv=None):
    parser = argparse.ArgumentParser(prog="recscore", description="Real-time recommendation scoring.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="recommend on a synthetic catalogue (default) or on MovieLens")
    demo.add_argument("--movielens", metavar="PATH", help="folder of MovieLens latest-small (ratings.csv, movies.csv)")
    demo.add_argument("-k", type=int, default=10, help="recommendations per user (default 10)")
    demo.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int4"],
                      help="how item rows are stored for lookup and retrieval (default fp32)")
    engine_commands.add_parsers(commands)
    args = parser.parse_args(argv)
    if args.command in engine_commands.ENGINE_COMMANDS:
        return engine_commands.run(args)

    from . import demo as demo_module
    if args.movielens:
        try:
            demo_module.run_movielens(args.movielens, k=args.k, dtype=args.dtype)
        except FileNotFoundError as error:
            print(f"recscore demo: {error}", file=sys.stderr)
            return 2
    else:
        demo_module.run_synthetic(k=args.k, dtype=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
