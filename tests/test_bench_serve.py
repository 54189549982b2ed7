"""bench/serve.py in its CPU mode (demo model, small counts) and the full-vocabulary tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.architectures import full_vocab_tokenizer
from bench.serve import main

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_serve_benchmark_runs_every_scenario_on_cpu(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One OpenMP thread per caller in the child processes: on a 2-core machine shared with other
    # work, the server's threads (worker, preparation) each spinning an OpenMP team slow it ~8x.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "serve.json"
    results = main(
        [
            "--device", "cpu", "--model", str(demo_model_dir), "--concurrency", "2", "--rounds", "2",
            "--new-tokens", "12", "--image-size", "96", "--followup-concurrency", "1",
            "--followup-rounds", "1", "--arrive", "2,2,0.5,1.5", "--workdir", str(tmp_path / "work"),
            "--out", str(out), "--server-env", "EXECUTOR_PROFILE_SECONDS=0.5",
        ]
    )  # fmt: skip
    assert out.exists()
    executor, ws, openai = results["executor"][2], results["ws"][2], results["openai"][2]
    for figures in (ws, openai):
        assert figures["errors"] == 0, figures["first_error"]
        assert figures["requests"] >= 2 and figures["rps"] > 0 and figures["tokens_mean"] > 0
        assert 0 < figures["ttft_p50"] <= figures["lat_p50"]
        # the server's own TTFT (from /metrics) is part of what the client waited for
        assert 0 < figures["server_ttft_mean"] <= figures["ttft_mean"]
    assert executor["rps"] > 0
    assert max(ws["deltas_max"], openai["deltas_max"]) > 1  # answers stream, not one piece at the end
    follow = results["followup"][1]
    assert follow["first"]["requests"] == follow["followup"]["requests"] == 1
    assert not math.isnan(follow["followup"]["ttft_p50"])
    assert 0 < follow["followup"]["server_ttft_p50"] <= follow["followup"]["ttft_p50"]
    profile = "\n".join(results["profile"])  # the server logged where its time went
    for series in ("executor over", "prepare n=", "decode_step n=", "prefill phases over", "host_vision n="):
        assert series in profile, profile
    arriving = results["arriving"]
    assert arriving["arrivals"]["requests"] > 0 and arriving["arrivals"]["errors"] == 0
    assert arriving["streamed"]["errors"] == 0
    assert arriving["quiet"]["gaps"] + arriving["busy"]["gaps"] > 0


def test_full_vocab_tokenizer_decodes_every_id_and_round_trips(demo_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    full_vocab_tokenizer(demo_model_dir, tmp_path, 151_936)
    wide = AutoTokenizer.from_pretrained(tmp_path)
    demo = AutoTokenizer.from_pretrained(demo_model_dir)
    assert len(wide) == 151_936
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
    assert wide(text)["input_ids"] == demo(text)["input_ids"]
    for token_id in (len(demo), 5_000, 77_777, 151_935):
        piece = wide.decode([token_id], skip_special_tokens=True)
        assert piece.startswith(" ") and piece.strip().isalpha(), (token_id, piece)
    assert len({wide.decode([i]) for i in range(len(demo), len(demo) + 2000)}) == 2000  # all distinct
    # An answer's text encodes back to its ids, as a real model's does when the next turn repeats it.
    answer = [len(demo) + 3, 90_001, 5_000, 151_935, 12_345, len(demo) + 70]
    assert wide(wide.decode(answer), add_special_tokens=False)["input_ids"] == answer
