#!/usr/bin/env python3
"""The stallmesh models in onnxruntime, single-threaded, for the side-by-side benchmark.

`cargo bench --bench inference` runs this with the exact token ids and image tensor it gave tract and
prints both medians and their ratio. Alone: onnxruntime_bench.py MODELS_DIR IDS IMAGE_F32_FILE RUNS
(IDS comma-separated; the image file is 3*224*224 little-endian f32). Prints one JSON line.
"""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def session(path):
    opts = ort.SessionOptions()
    # One core, as tract runs: the comparison is per core.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def median_ms(fn, runs):
    for _ in range(max(5, runs // 10)):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def main():
    models, ids, image_file, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ids = np.array([[int(x) for x in ids.split(",")]], dtype=np.int64)
    text = session(f"{models}/all-MiniLM-L6-v2-dynint8.onnx")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    text_ms = median_ms(lambda: text.run(None, feeds), runs)
    image = session(f"{models}/efficientnet-lite0-feat.onnx")
    pixels = np.fromfile(image_file, dtype="<f4").reshape(1, 3, 224, 224)
    image_ms = median_ms(lambda: image.run(None, {"input": pixels}), runs)
    print(json.dumps({"onnxruntime": ort.__version__, "text_ms_median": text_ms, "image_ms_median": image_ms, "tokens": ids.shape[1]}))


if __name__ == "__main__":
    main()
