"""Time recscore against its peers by the protocol and record the results.

    python -m bench.compare embedding topk qmatmul     # run groups, write results/*.json and RESULTS.md
    python -m bench.compare topk --quick               # fewer, smaller cases; prints only
    python -m bench.compare topk --only "B=1 "         # only cases whose name contains the text
"""
import argparse

from bench.protocol import run_group


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="comparison groups: bench/compare_<group>.py")
    parser.add_argument("--quick", action="store_true", help="small shapes, nothing recorded")
    parser.add_argument("--only", help="run only the cases whose name contains this text (prints, records nothing)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    for group in args.groups:
        print(f"## {group}", flush=True)
        run_group(group, quick=args.quick, write=not (args.no_write or args.only), only=args.only)


if __name__ == "__main__":
    main()
