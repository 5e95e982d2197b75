"""A mechanism check for ICDPO (docs/inference_time.md): demonstrations that copy one candidate.

Reads a finished `alignkit generate` run's candidates.jsonl and writes, for every prompt, one demonstration
row {prompt, chosen} whose response is that prompt's candidate number K. Run ICDPO again with the same
sampling settings (the same candidates are drawn) and these demonstrations: a model that uses its context
should now prefer candidate K far more often than 1/n.

    python examples/inference/copy_demos.py runs/icdpo/candidates.jsonl 3 > runs/copy_demos.jsonl
"""

import json
import sys

path, k = sys.argv[1], int(sys.argv[2])
for line in open(path, encoding="utf-8"):
    row = json.loads(line)
    print(json.dumps({"prompt": row["prompt"], "chosen": row["candidates"][k]["text"]}, ensure_ascii=False))
