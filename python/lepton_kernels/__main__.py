"""``python -m lepton_kernels <command>``: ``predict`` classifies images with a model, ``demo`` runs the demo."""

from __future__ import annotations

import argparse
import sys


def _demo(argv) -> int:
    from . import demo
    return demo.main(argv)


def main(argv=None) -> int:
    from . import predict
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m lepton_kernels",
                                     description="lepton-kernels: fast fused kernels for classic CNNs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("predict", help="classify image files with a model (ONNX, Keras 3 or lepton file)",
                       description=predict.__doc__.split("\n\n")[0])
    predict.add_arguments(p)
    sub.add_parser("demo", help="run the demo (its own options follow: demo --help)", add_help=False)
    if argv and argv[0] == "demo":  # everything after 'demo' belongs to the demo
        return _demo(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict.run(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
