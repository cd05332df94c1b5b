"""``fastkd bench cache``: the size part writes rows of the shared benchmark schema, and the sizes are the format's."""

from __future__ import annotations

import json

from fastkd.bench import load_script


def test_bench_cache_size_rows_follow_the_format(tmp_path):
    bench = load_script("cache")
    out = tmp_path / "tc.csv"
    assert bench.main(["--parts", "size", "--out", str(out)]) == 0
    rows = bench.C.read_rows(out)
    with open(out) as f:
        assert f.readline().strip().split(",") == bench.C.FIELDS
    sizes = [r for r in rows if r["metric"] == "bytes_per_image_epoch"]
    assert len(sizes) == 8 and all(r["benchmark"] == "teacher_cache" and r["commit"] and r["cpu_model"]
                                   and r["load_avg_1m"] for r in sizes)
    for r in sizes:
        c = r["cfg"]
        k, classes, item = c["k"], c["classes"], 4 if c["dtype"] == "float32" else 2
        # index (int64) + pad (bool) + view parameters + fingerprint (3 float32) + K logits; below all classes also K
        # class ids (int32) and the tail logit (float32)
        want = 8 + 1 + c["view_params_bytes"] + 12 + k * item + (k * 4 + 4 if k < classes else 0)
        header = (float(r["p50"]) - want) * c["images"]  # the .npy header (the record's long descr: a few KiB)
        assert 0 < header <= 8192, (r["provider"], r["mode"], r["p50"], want)
    assert json.loads(sizes[0]["config"])["views_of"] == "deit_s_in1k"
