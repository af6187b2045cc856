"""The demo's findings under both user-token layouts (``user_position``: ``prefix``, the paper's,
and ``before_response``), same data, seed and settings:

    python benchmarks/layout_quality.py --json layout_quality.json [--seed 0]

Runs ``prlhf demo`` (without the cold-start part) once per layout and writes, per layout, each
method's accuracies and words per group, the findings, and the runtime::

    {"prefix": {"methods": {...}, "findings": {...}, "runtime_seconds": s}, "before_response": {...},
     "difference": {method: {"seen": d, "generic": d, "unseen": d, "words_minority": d, ...}}}
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["dpo", "pdpo_individual", "pdpo_cluster"])
    a = p.parse_args(argv)
    from prlhf.experiments.demo import check_findings, run_demo

    out = {}
    for layout in ("prefix", "before_response"):
        report = run_demo(Path(tempfile.mkdtemp(prefix=f"prlhf-layout-{layout}-")), seed=a.seed, methods=a.methods,
                          cold_start=False, user_position=layout)
        out[layout] = {"methods": {m: {"accuracy": v["accuracy"], "length": v["length"]}
                                   for m, v in report["methods"].items()},
                       "findings": check_findings(report), "runtime_seconds": report["runtime_seconds"]}
    diff = {}
    for m in a.methods:
        x, y = out["prefix"]["methods"][m], out["before_response"]["methods"][m]
        diff[m] = {**{k: y["accuracy"][k] - x["accuracy"][k] for k in ("seen", "generic", "unseen")},
                   **{f"words_{g}": y["length"][g] - x["length"][g] for g in x["length"] if g in y["length"]}}
    out["difference"] = diff
    print("\n| method | layout | acc seen | acc generic | acc unseen | words majority | words minority | words unseen |")
    print("|---|---|---|---|---|---|---|---|")
    for m in a.methods:
        for layout in ("prefix", "before_response"):
            r = out[layout]["methods"][m]
            print(f"| {m} | {layout} | " + " | ".join(f"{r['accuracy'][k]:.3f}" for k in ("seen", "generic", "unseen"))
                  + " | " + " | ".join(f"{r['length'].get(g, float('nan')):.1f}" for g in ("majority", "minority", "unseen"))
                  + " |")
    for layout in ("prefix", "before_response"):
        held = sum(out[layout]["findings"].values())
        print(f"{layout}: {held}/{len(out[layout]['findings'])} findings hold; "
              f"{out[layout]['runtime_seconds']:.0f} s")
    atomic_write_text(a.json, json.dumps({**out, "run": benchmark_record()}, indent=1))
    print(f"wrote {a.json}")
    return out


if __name__ == "__main__":
    main()
