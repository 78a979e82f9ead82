#!/usr/bin/env python3
"""Markdown tables for docs/performance.md from the benchmarks' JSON, so that
no figure there is typed in by hand.

  tables.py real_steps JSON FAMILY...   one table per family of bench_real_steps,
                                        then the issue-21 targets, row by row
  tables.py sweep JSON                  bench_policy_sweep's rows
"""
import json
import sys

POLICIES = {
    "halve": "halve",
    "geometric_0_9": "geometric ×0.9",
    "bisect": "bisect",
    "bisect_resume": "bisect + resume",
    "predictive": "predictive",
    "predictive_resume": "predictive + resume",
}


def rows(path):
    return json.load(open(path))["benchmarks"]


def real_steps(path, families):
    by = {}
    for b in rows(path):
        # real_steps/<policy>/family:F/faults%:P/iterations:1
        parts = b["name"].split("/")
        by[(parts[1], parts[2].split(":")[1], parts[3].split(":")[1])] = b
    for family in families:
        print(f"| family {family} | faults | further failed in the first batch, mean (max) "
              "| plan after batch 1 / best, mean (worst) | failed in the next 11 batches, mean (max) "
              "| plan after 12 / best, mean (worst) | plan after 12 / largest that runs, mean (worst) "
              "| thrown away per recovery (global batches) | global batches given up |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, name in POLICIES.items():
            for faults in ("0", "1", "5"):
                b = by.get((key, family, faults))
                if b is None:
                    continue
                print(f"| {name} | {faults} % | {b['further_mean']:.2f} ({b['further_max']:.0f}) "
                      f"| {b['after_first_mean']:.3f} ({b['after_first_worst']:.3f}) "
                      f"| {b['later_mean']:.2f} ({b['later_max']:.0f}) "
                      f"| {b['ratio_mean']:.3f} ({b['ratio_worst']:.3f}) "
                      f"| {b['vs_largest_mean']:.3f} ({b['vs_largest_worst']:.3f}) "
                      f"| {b['thrown_mean']:.3f} | {b['given_up']:.0f} |")
        print()
    # Issue 21's targets, for predictive and bisect + resume.
    targets = [
        ("further failures in batch 1, mean <= 1.0", lambda b: b["further_mean"] <= 1.0, "further_mean", 2),
        ("further failures in batch 1, max <= 3", lambda b: b["further_max"] <= 3, "further_max", 0),
        ("plan after batch 1 >= 0.97 of best (mean)", lambda b: b["after_first_mean"] >= 0.97, "after_first_mean", 3),
        ("failures over the next 11 batches <= 2 (mean)", lambda b: b["later_mean"] <= 2, "later_mean", 2),
        ("failures over the next 11 batches <= 2 (max)", lambda b: b["later_max"] <= 2, "later_max", 0),
        ("plan after 12 batches >= 0.97 of best (mean)", lambda b: b["ratio_mean"] >= 0.97, "ratio_mean", 3),
        ("work thrown away <= 0.3 global batch (mean)", lambda b: b["thrown_mean"] <= 0.3, "thrown_mean", 3),
    ]
    cols = [(f, k, p) for f in families for k in ("predictive", "bisect_resume") for p in ("0", "1", "5")
            if (k, f, p) in by]
    print("| target | " + " | ".join(f"{POLICIES[k]}, family {f}, {p} %" for f, k, p in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for text, ok, field, digits in targets:
        cells = []
        for f, k, p in cols:
            b = by[(k, f, p)]
            cells.append(f"{b[field]:.{digits}f} {'holds' if ok(b) else '**fails**'}")
        print(f"| {text} | " + " | ".join(cells) + " |")
    print()


def sweep(path):
    print("| shrink policy (`bench_policy_sweep`) | workloads | final m / best m, mean | worst "
          "| failed attempts after the first OOM, all 12 batches | samples thrown away per global batch "
          "| global batches given up |")
    print("|---|---|---|---|---|---|---|")
    for b in rows(path):
        group, key = b["name"].split("/")[:2]
        if group == "plan_cache_rows":  # issue 24's rows: a table of their own in docs/performance.md
            continue
        label = POLICIES[key] + (", framework (family 4)" if group == "sweep_framework" else "")
        given_up = f"{b['given_up']:.0f}" if "given_up" in b else "–"
        print(f"| {label} | {b['workloads']:.0f} | {b['ratio_mean']:.3f} | {b['ratio_worst']:.3f} "
              f"| {b['failures_mean']:.2f} | {b['wasted_mean']:.3f} | {given_up} |")
    print()


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "real_steps":
        real_steps(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 3 and sys.argv[1] == "sweep":
        sweep(sys.argv[2])
    else:
        sys.exit(__doc__)
