"""The `recscore` command."""
import argparse
import sys

from . import commands as engine_commands
from .serve import commands as serve_commands


def main(argv=None):
    parser = argparse.ArgumentParser(prog="recscore", description="Real-time recommendation scoring.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the engine end to end on a synthetic catalogue (default), the bare "
                                            "kernels (--kernels), or the kernels on MovieLens (--movielens)")
    demo.add_argument("--kernels", action="store_true", help="the bare lookup + top-k path on 20,000 synthetic items")
    demo.add_argument("--movielens", metavar="PATH", help="folder of MovieLens latest-small (ratings.csv, movies.csv)")
    demo.add_argument("--no-llm", action="store_true", help="the engine without the LLM rerank and explanation")
    demo.add_argument("-k", type=int, default=10, help="recommendations per user (default 10)")
    demo.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int4"],
                      help="--kernels, --movielens: how item rows are stored for lookup and retrieval (default fp32)")
    engine_commands.add_parsers(commands)
    serve_commands.add_parsers(commands)
    encode = commands.add_parser("encode", help="embed texts with all-MiniLM-L6-v2 on the int8 kernels (recscore.models.minilm)")
    encode.add_argument("texts", nargs="+", metavar="text")
    encode.add_argument("--dtype", default="int8", choices=["int8", "int4", "fp32"], help="weights (default int8)")
    encode.add_argument("--values", type=int, default=6, help="leading values printed per vector (default 6)")
    generate = commands.add_parser("generate", help="continue a prompt with a GGUF LLM (default: the packaged Gemma 3 270M)")
    generate.add_argument("prompt")
    generate.add_argument("-n", "--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--top-k", type=int, default=0, help="0 (default): off")
    generate.add_argument("--top-p", type=float, default=1.0, help="1 (default): off")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    generate.add_argument("--model", metavar="GGUF", help="a Gemma 3 GGUF file instead of the packaged one")
    generate.add_argument("--context", type=int, help="KV cache positions (default: the runtime's, 4096)")
    generate.add_argument("--threads", type=int, help="kernel threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.command == "encode":
        from .models.minilm import encode_command
        return encode_command(args)
    if args.command == "generate":
        from .models.llm import generate_command
        return generate_command(args)
    if args.command in engine_commands.ENGINE_COMMANDS:
        return engine_commands.run(args)
    if args.command in serve_commands.SERVE_COMMANDS:
        return serve_commands.run(args)

    from . import demo as demo_module
    if args.movielens:
        try:
            demo_module.run_movielens(args.movielens, k=args.k, dtype=args.dtype)
        except FileNotFoundError as error:
            print(f"recscore demo: {error}", file=sys.stderr)
            return 2
    elif args.kernels:
        demo_module.run_synthetic(k=args.k, dtype=args.dtype)
    else:
        demo_module.run_engine(k=args.k, llm=not args.no_llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
