"""`python -m nondet_hpc.compare RUN_A RUN_B`: where did two runs part, and why?

Prints the identity keys and environment facts that differ, the first recorded point at which
the parameters differ, the distance at every recorded point, the five parameter tensors that
differ most there, the final logits' disagreement and one verdict line
(:mod:`nondet_hpc.analysis.compare_runs`). Exit status: 0 identical or different as their configs
imply; 1 different although config and environment match (a source of nondeterminism is not
controlled); 2 a folder that cannot be compared. Reads the folders only (copies from another
machine work); executes nothing from them.
"""

from __future__ import annotations

import argparse
import sys

from .analysis.compare_runs import UNCONTROLLED, CompareError, compare_runs, render


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nondet_hpc.compare", description=__doc__.split("\n\n")[1])
    ap.add_argument("run_a", help="a run folder (SWEEP_DIR/runs/<run id>, or a copy of one)")
    ap.add_argument("run_b", help="another run folder")
    args = ap.parse_args(argv)
    try:
        c = compare_runs(args.run_a, args.run_b)
    except CompareError as e:
        print(f"nondet_hpc.compare: {e}", file=sys.stderr)
        return 2
    print(render(c))
    return 1 if c.verdict == UNCONTROLLED else 0


if __name__ == "__main__":
    sys.exit(main())
