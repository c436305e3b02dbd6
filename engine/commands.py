"""The engine's commands: `recscore build`, `recscore recommend`, `recscore explain`, `recscore eval`
(see cli.py)."""
import sys

ENGINE_COMMANDS = ("build", "recommend", "explain", "eval")
LLM_HELP = "use the packaged Gemma 3 270M (loaded on first use, about a second)"


def add_parsers(commands):
    build = commands.add_parser("build", help="clean data, tune and fit the models, write a bundle")
    build.add_argument("data", nargs="?", help="events CSV with columns user,item,value,timestamp")
    build.add_argument("--items", metavar="CSV", help="items CSV with columns item,title,genres (genres split by |)")
    build.add_argument("--movielens", metavar="PATH", help="a MovieLens folder (ratings.csv, movies.csv) instead")
    build.add_argument("--min-value", type=float, help="events with a smaller value are dropped (and counted)")
    build.add_argument("--max-value", type=float, help="events with a larger value are dropped (and counted)")
    build.add_argument("--no-tune", action="store_true", help="keep the default serving config (no validation search)")
    build.add_argument("--content", action="store_true",
                       help="also encode each item's title and genres with the MiniLM text encoder (for text=)")
    build.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write")
    recommend = commands.add_parser("recommend", help="recommend items for a user of a bundle")
    recommend.add_argument("bundle")
    recommend.add_argument("user", type=int, help="the data's user id (MovieLens userId)")
    recommend.add_argument("-k", type=int, default=10)
    recommend.add_argument("--allow-genre", action="append", default=[], help="only items of these genres")
    recommend.add_argument("--deny-genre", action="append", default=[], help="no items of these genres")
    recommend.add_argument("--llm", action="store_const", const="gemma3", help=f"re-rank with the LLM: {LLM_HELP}")
    explain = commands.add_parser("explain", help="why an item suits a user, written by the LLM as it generates")
    explain.add_argument("bundle")
    explain.add_argument("user", type=int, help="the data's user id (MovieLens userId)")
    explain.add_argument("item", type=int, help="the data's item id (MovieLens movieId)")
    explain.add_argument("--llm", action="store_const", const="gemma3", help=f"needed: {LLM_HELP}")
    evaluate = commands.add_parser("eval", help="temporal-split evaluation of a bundle against baselines")
    evaluate.add_argument("bundle")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for the 95%% intervals")


def run(args):
    from .engine import FeatureUnavailable, UnknownItem

    try:
        if args.command == "build":
            return _build(args)
        if args.command == "recommend":
            return _recommend(args)
        if args.command == "explain":
            return _explain(args)
        return _evaluate(args)
    except (FileNotFoundError, ValueError, UnknownItem) as error:
        print(f"recscore {args.command}: {error}", file=sys.stderr)
        return 2
    except FeatureUnavailable as error:
        print(f"recscore {args.command}: {error}; add --llm", file=sys.stderr)
        return 2


def _build(args):
    from . import bundle

    if args.movielens:
        catalogue, events, malformed = bundle.read_movielens(args.movielens)
        value_range = bundle.MOVIELENS_VALUE_RANGE
    elif args.data:
        events = bundle.read_events_csv(args.data)
        *events, malformed = events
        if args.items:
            catalogue = bundle.read_items_csv(args.items)
        else:
            ids = sorted(set(events[1].tolist()))
            catalogue = bundle.Catalogue(ids, [str(i) for i in ids], [[] for _ in ids])
        value_range = None
    else:
        raise ValueError("give an events CSV or --movielens PATH")
    if args.min_value is not None or args.max_value is not None:
        low, high = value_range or (-float("inf"), float("inf"))
        value_range = (args.min_value if args.min_value is not None else low,
                       args.max_value if args.max_value is not None else high)
    bundle.build(catalogue, events, args.output, value_range=value_range, malformed=malformed, tune=not args.no_tune,
                 content=args.content)
    return 0


def _recommend(args):
    from .engine import Engine

    filters = {"allow_genres": args.allow_genre, "deny_genres": args.deny_genre}
    with Engine.open(args.bundle, llm=args.llm) as engine:
        result = engine.recommend(args.user, args.k, filters=filters if args.allow_genre or args.deny_genre else None,
                                  rerank="llm" if args.llm else None)
        print(f"user {args.user}: {result.source}, {result.timings_ms['total']:.3f} ms")
        for rank, (item, score) in enumerate(zip(result.items, result.scores), 1):
            print(f"{rank:3d}. {score:9.4f}  {item:>8}  {engine.title(item)}")
    return 0


def _explain(args):
    from .engine import Engine

    with Engine.open(args.bundle, llm=args.llm) as engine:
        print(f"user {args.user}, item {args.item}: {engine.title(args.item)}", flush=True)
        for piece in engine.explain_stream(args.user, args.item):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0


def _evaluate(args):
    from .evaluate import evaluate_bundle, format_table

    table = evaluate_bundle(args.bundle, samples=args.bootstrap)
    print("temporal split: each user's last 20% of events held out; full ranking over the catalogue; "
          "mean [bootstrap 95% interval over users]")
    print(format_table(table))
    return 0
