#!/usr/bin/env python3
"""Agreement between the counting detector and the shapes world's exact scorer on model samples.

    softalign detect --detector assets/shapes-detector/shapes-detector.torchscript \
        --images <eval>/*/samples/*.png --conf 0.1 --iou 0.3 --output det.jsonl
    python scripts/detector_vs_scorer.py <eval>/results.jsonl det.jsonl

For every image the scorer judged (GenEval's results.jsonl with its `details`: each class's
detections as [x0, y0, x1, y1, confidence], confidence being the soft IoU of the fitted shape),
counts each class twice: the scorer's detections at or above a confidence threshold (0.5, its
`threshold`; 0.6, its `counting_threshold`) and the detector's. Prints the fraction of
(image, class) cells where the two agree, per class and for the counting prompts' asked class,
with Wilson 95% intervals, and the counting verdicts each would give. Standard library only.
"""
import json
import math
import sys

CLASSES = ["circle", "square", "triangle", "diamond"]


def wilson(k, n, z=1.96):
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def fmt(k, n):
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {100 * k / max(n, 1):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def main(results_path, detections_path):
    det = {}
    with open(detections_path) as f:
        for line in f:
            r = json.loads(line)
            det[r["file"]] = r["counts"]
    rows = []
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            if r["filename"] not in det:
                sys.exit(f"{detections_path}: no detections for {r['filename']}")
            rows.append(r)
    for thr in (0.5, 0.6):
        agree = {c: 0 for c in CLASSES}
        for r in rows:
            details = json.loads(r["details"] or "{}")
            for c in CLASSES:
                s = sum(1 for d in details.get(c, []) if d[4] >= thr)
                agree[c] += s == det[r["filename"]].get(c, 0)
        n = len(rows)
        print(f"scorer confidence >= {thr}: per-class count agreement over {n} images")
        for c in CLASSES:
            print(f"  {c:9s} {fmt(agree[c], n)}")
        print(f"  all       {fmt(sum(agree.values()), 4 * n)}")
    counting = [r for r in rows if r["tag"] == "counting"]
    same = scorer_ok = det_ok = 0
    for r in counting:
        meta = json.loads(r["metadata"])
        want = meta["include"][0]
        details = json.loads(r["details"] or "{}")
        s = sum(1 for d in details.get(want["class"], []) if d[4] >= 0.6)
        d = det[r["filename"]].get(want["class"], 0)
        same += s == d
        scorer_ok += r["correct"]
        det_ok += d == want["count"]
    print(f"counting prompts ({len(counting)} images), asked class:")
    print(f"  count agreement          {fmt(same, len(counting))}")
    print(f"  scorer verdict correct   {fmt(scorer_ok, len(counting))}")
    print(f"  detector count == asked  {fmt(det_ok, len(counting))}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
