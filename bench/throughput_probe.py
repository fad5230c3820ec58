"""One throughput probe of ``tokensurgeon distill`` from a given source tree.

Usage: ``python bench/throughput_probe.py TREE SPEC_JSON``. TREE is this checkout or an
exported earlier one (``git archive COMMIT | tar -x -C TREE``); its ``distill`` and
``tokensurgeon`` packages are imported instead of the installed ones and trained for
``steps`` optimizer steps, batch 4 x 128, with SPEC's ``options`` as further
``DistillConfig`` fields (none for an old tree: only the fields every tree since the ALM
trainer landed accepts). Prints one JSON line: student tokens per CPU-second over the steps
after the first, so an old commit and today's code are measured the same way, side by side.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def main() -> None:
    tree, spec = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    from distill.trainer import DistillConfig, distill
    from tokensurgeon import training

    assert os.path.realpath(training.__file__).startswith(os.path.realpath(tree)), training.__file__
    rows = []
    original = training.MetricsLog.log

    def log(self, **figures):
        rows.append({**figures, "cpu": time.process_time(), "wall": time.perf_counter()})
        return original(self, **figures)

    training.MetricsLog.log = log
    cfg = DistillConfig(teacher=spec["teacher"], student=spec["student"], data=spec["data"],
                        out=spec["out"], loss=spec["loss"], train=spec["train"],
                        steps=spec["steps"], batch_size=4, max_length=128, lr=1e-4,
                        warmup_steps=1, checkpoint_every=10_000, overwrite=True, quiet=True,
                        device="cpu", **spec.get("options", {}))
    distill(cfg)
    timed = rows[1:]
    # The exported a44fea8 tree names the key student_tokens; today's trainer, tokens.
    tokens = sum(r.get("tokens", r.get("student_tokens", 0)) for r in timed)
    cpu, wall = timed[-1]["cpu"] - rows[0]["cpu"], timed[-1]["wall"] - rows[0]["wall"]
    shutil.rmtree(spec["out"], ignore_errors=True)
    print(json.dumps({"tree": tree, "loss": spec["loss"], "train": spec["train"],
                      "options": spec.get("options", {}), "threads": spec.get("threads", 1),
                      "timed_steps": len(timed), "tokens": tokens, "cpu_s": round(cpu, 1),
                      "wall_s": round(wall, 1), "tokens_per_cpu_s": round(tokens / cpu, 2),
                      "tokens_per_wall_s": round(tokens / wall, 2),
                      "losses": [r["loss"] for r in rows],
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "load_avg": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]}))


if __name__ == "__main__":
    main()
