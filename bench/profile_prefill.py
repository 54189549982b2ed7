"""Where does prefill time go? Times the parts of a batched prompt on the GPU.

python bench/profile_prefill.py --model 2b
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.architectures import build_checkpoint
from bench.executor import noise_jpeg
from protocol.pictures import ImageLimits
from server.inference.api import Turn
from server.inference.model.demo import build_demo_model
from server.inference.model.runner import ModelRunner


def timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="2b")
    parser.add_argument("--batches", default="1,4,16")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    demo = build_demo_model(work / "demo")
    build_checkpoint(args.model, work / args.model, demo)
    runner = ModelRunner.load(
        str(work / args.model),
        device="cuda",
        dtype="bfloat16",
        limits=ImageLimits(max_pixels=1024 * 1024),
        max_context_tokens=4096,
    )
    model = runner.model
    images = [noise_jpeg(1024, i) for i in range(16)]
    print("| batch | prepare ms/img (CPU) | h2d ms | vision ms | full prefill ms | prefill ms/img |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        started = time.perf_counter()
        prompts = [runner.prompts.build([Turn.user("Describe.", [images[i]])]) for i in range(batch)]
        prepare = (time.perf_counter() - started) / batch
        inputs = runner.model_inputs(prompts)
        h2d = timed(lambda: runner.model_inputs(prompts))
        pixel, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        with torch.inference_mode():
            vision = timed(lambda: model.model.get_image_features(pixel, grid))
            full = timed(lambda: model(**runner.model_inputs(prompts), use_cache=True, logits_to_keep=1))
        print(
            f"| {batch} | {prepare * 1000:.1f} | {h2d * 1000:.1f} | {vision * 1000:.1f} | "
            f"{full * 1000:.1f} | "
            f"{full * 1000 / batch:.1f} |",
            flush=True,
        )
    batch = int(args.batches.split(",")[-1])
    prompts = [runner.prompts.build([Turn.user("Describe.", [images[i]])]) for i in range(batch)]
    with (
        torch.inference_mode(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof,
    ):
        model(**runner.model_inputs(prompts), use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
