"""bench/gpu.py --tiny: every part of the GPU benchmark runs on the CPU, its numbers are finite, the two captioners
are compared, and the compiled stage-1 step has no graph break."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(d):
    for v in d.values() if isinstance(d, dict) else d:
        if isinstance(v, (dict, list)):
            yield from numbers(v)
        elif isinstance(v, float):
            yield v


def test_tiny_run_covers_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--tiny", f"--out={out}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    parts = ("stage-1 step", "stage-2 step", "caption", "FlanT5-XL")
    assert {part: r[part].get("error") for part in parts} == dict.fromkeys(parts), p.stderr[-3000:]
    assert all(math.isfinite(v) for v in numbers(r))

    s1 = r["stage-1 step"]
    assert s1["flops_per_step"] > 0 and s1["batch"] == 4
    for mode in ("eager", "compiled"):
        assert s1[mode]["step_s"] > 0 and s1[mode]["images_per_s"] > 0
        assert s1[mode]["mfu"] is None  # no peak FLOP/s known for a CPU
    assert s1["graph_breaks"] == 0, s1["break_reasons"]  # the whole forward is one graph
    assert r["stage-2 step"]["step_s"] > 0 and r["stage-2 step"]["loss"] > 0

    for row in ("greedy", "beam 5"):  # in fp32 the two agree exactly
        ids = r["caption"][f"{row}, ids"]
        assert len(ids["nanoblip2"]) == 5 and ids["same_ids"] and ids["first_difference"] is None
        assert r["caption"][f"{row}, nanoblip2"]["s"] > 0 and r["caption"][f"{row}, transformers"]["s"] > 0
    assert r["FlanT5-XL"]["logits_finite"] is True
    assert "| stage-1 step, compiled | 4 |" in p.stdout and "error" not in p.stdout
