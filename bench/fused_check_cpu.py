"""The CUDA paths of the decode step and the packed prefill (fused Triton kernels), run on the CPU
through Triton's interpreter and compared with the stock paths on the demo model (float32).

    TRITON_INTERPRET=1 python bench/fused_check_cpu.py

Needs triton installed beside the CPU torch, and numpy < 2.3 (triton 3.6's interpreter converts
one-element arrays to ints, which later numpy refuses). Not a test: CI's environment has neither.
Expected: differences ~1e-6 of logits of size ~3, the same argmax everywhere.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protocol.pictures import ImageLimits
from server.inference.api import SamplingParams, Turn
from server.inference.engine import Sequence
from server.inference.model.demo import build_demo_model
from server.inference.model.model_engine import EngineOptions, ModelEngine
from tests.conftest import make_png

demo = build_demo_model(Path(tempfile.mkdtemp()) / "demo")
engine = ModelEngine.load(
    str(demo),
    device="cpu",
    dtype="float32",
    limits=ImageLimits(),
    options=EngineOptions(max_batch=4, max_context_tokens=2048, prefix_cache=False),
)
convs = [
    [Turn.user("What is this?", [make_png(320, 256)])],
    [Turn.user("Hello there, two?", [make_png(96, 64, (9, 200, 30)), make_png(64, 160)])],
]


def run():  # type: ignore[no-untyped-def]
    seqs = [
        Sequence(str(i), engine.prepare(t), SamplingParams(max_new_tokens=6), 6) for i, t in enumerate(convs)
    ]
    for s in seqs:
        assert engine.reserve(s)
    engine.keep_logits = True
    engine.prefill(seqs)
    assert engine.prefill_logits is not None
    pre = [logits.clone() for logits in engine.prefill_logits]
    steps = []
    for _ in range(5):
        engine.decode(seqs).tokens()
        steps.append(engine.step.logits[: len(seqs)].clone())
    for s in seqs:
        engine.release(s)
    return pre, steps


a_pre, a_steps = run()
kernels = __import__("server.inference.model.kernels", fromlist=["fuse_projections"])  # imports triton
kernels.fuse_projections(engine.model)
engine.forward.fused = True
setattr(engine.step, "_forward", engine.step._forward_fused)  # noqa: B010  # the fused step, eagerly
b_pre, b_steps = run()
for x, y in zip(a_pre, b_pre, strict=True):
    print(
        "prefill max abs diff",
        float((x - y).abs().max()),
        "scale",
        float(x.abs().max()),
        "argmax equal",
        bool((x.argmax(-1) == y.argmax(-1)).all()),
    )
for x, y in zip(a_steps, b_steps, strict=True):
    print(
        "decode max abs diff",
        float((x - y).abs().max()),
        "argmax equal",
        bool((x.argmax(-1) == y.argmax(-1)).all()),
    )
