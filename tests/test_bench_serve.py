"""bench/serve.py in its CPU mode (demo model, small counts), its clients' processes, and the
full-vocabulary tokenizer."""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path

import pytest
import torch

from bench.architectures import full_vocab_tokenizer
from bench.serve import client_processes, main
from bench.serve_clients import Group, Pictures, Role, burst_offsets, run_clients, split


def test_clients_are_spread_evenly_and_bursts_cover_the_busy_phase() -> None:
    assert split(64, 8) == [8] * 8 and split(5, 2) == [3, 2] and split(1, 4) == [1] and split(0, 2) == []
    assert burst_offsets(1.0, 4) == [0, 1, 2, 3] and burst_offsets(0.5, 1.5) == [0, 0.5, 1.0]
    assert client_processes("auto", 64, cpu=True) == 1 and client_processes("4", 2, cpu=False) == 2


@pytest.mark.parametrize("spawn", [False, True], ids=["in-process", "workers"])
async def test_a_client_error_surfaces_instead_of_hanging(spawn: bool) -> None:
    with socket.socket() as refusing:  # bound, not listening: every connection is refused
        refusing.bind(("127.0.0.1", 0))
        ws = f"ws://127.0.0.1:{refusing.getsockname()[1]}/ws"
        groups = [
            Group(Role.WS, 2, 4, ws, "http://unused", asks=2),
            Group(Role.ARRIVAL, 1, 4, ws, "http://unused", every=0.5, seconds=1.0),  # ready, then called off
        ]
        with pytest.raises(RuntimeError, match="ws clients: ConnectionRefusedError"):
            await asyncio.wait_for(run_clients(groups, Pictures(32, 4), spawn=spawn, stop_after=2.0), 60)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_benchmark_runs_every_scenario_on_cpu(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One OpenMP thread per caller in the child processes: on a 2-core machine shared with other
    # work, the server's threads (worker, preparation) each spinning an OpenMP team slow it ~8x.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "serve.json"
    # Two client processes: ws and openai spread their 2 clients over them, arriving puts its
    # streamers in one and its arrivals in the other; ws1 keeps its clients in this process.
    results = main(
        [
            "--device", "cpu", "--model", str(demo_model_dir), "--concurrency", "2", "--rounds", "2",
            "--new-tokens", "12", "--image-size", "96", "--followup-concurrency", "1",
            "--followup-rounds", "1", "--arrive", "2,2,0.5,1.5", "--workdir", str(tmp_path / "work"),
            "--out", str(out), "--server-env", "EXECUTOR_PROFILE_SECONDS=0.5",
            "--scenarios", "executor,ws,ws1,openai,followup,arriving", "--client-processes", "2",
        ]
    )  # fmt: skip
    assert out.exists()
    executor, ws, openai = results["executor"][2], results["ws"][2], results["openai"][2]
    ws1 = results["ws1"][2]
    assert ws["client_processes"] == openai["client_processes"] == 2 and ws1["client_processes"] == 1
    for figures in (ws, ws1, openai):
        assert figures["errors"] == 0, figures["first_error"]
        assert figures["requests"] >= 2 and figures["rps"] > 0 and figures["tokens_mean"] > 0
        assert 0 < figures["ttft_p50"] <= figures["lat_p50"]
        # the server's own TTFT (from /metrics) is part of what the client waited for
        assert 0 < figures["server_ttft_mean"] <= figures["ttft_mean"]
    for figures in (ws, ws1):  # the server's `queued` comes before the first text
        assert 0 < figures["accept_p50"] <= figures["ttft_p50"]
        assert 0 < figures["upload_p50"] <= figures["accept_p50"]  # sent, then answered
    assert executor["rps"] > 0
    assert max(ws["deltas_max"], openai["deltas_max"]) > 1  # answers stream, not one piece at the end
    follow = results["followup"][1]
    assert follow["first"]["requests"] == follow["followup"]["requests"] == 1
    assert not math.isnan(follow["followup"]["ttft_p50"])
    assert 0 < follow["followup"]["server_ttft_p50"] <= follow["followup"]["ttft_p50"]
    # the server's own TTFT in two (the `done` frame's timings): prepared and queued, then prefilled
    asked = follow["followup"]
    assert asked["server_queued_p50"] > 0 and asked["server_prefill_p50"] > 0
    assert asked["server_queued_p50"] + asked["server_prefill_p50"] <= asked["ttft_p50"]
    profile = "\n".join(results["profile"])  # the server logged where its time went
    series_names = ("executor over", "prepare n=", "decode_step n=", "prefill phases over", "host_vision n=")
    for series in (*series_names, "relay over", "handoff n=", "websocket over", "write_wait n="):
        assert series in profile, profile
    arriving = results["arriving"]
    assert arriving["client_processes"] == 2 and arriving["streamer_processes"] == 1
    assert arriving["arrivals"]["requests"] > 0 and arriving["arrivals"]["errors"] == 0
    assert arriving["streamed"]["errors"] == 0
    assert arriving["quiet"]["gaps"] + arriving["busy"]["gaps"] > 0


@pytest.mark.slow
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


@torch.inference_mode()
def test_a_muted_random_model_answers_a_picture_with_text_from_its_first_token(demo_model_dir: Path) -> None:
    """bench/architectures.py's random checkpoints never sample an id that decodes to no text
    (a random 2B answered pictures with a lone byte ~30 times before any word: run of 2026-12-02)."""
    from transformers import AutoTokenizer

    from bench.architectures import mute_silent_ids, silent_ids
    from protocol.pictures import ImageLimits
    from server.inference.api import SamplingParams, Turn
    from server.inference.engine import Sequence
    from server.inference.model.model_engine import EngineOptions, ModelEngine
    from tests.conftest import make_png

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    silent = silent_ids(demo_model_dir)
    assert tokenizer.eos_token_id in silent and tokenizer.convert_tokens_to_ids("<|image_pad|>") in silent
    assert tokenizer.encode("a", add_special_tokens=False)[0] not in silent  # a letter has text
    assert any("\ufffd" in tokenizer.decode([i]) for i in silent)  # lone bytes of longer characters

    options = EngineOptions(max_batch=2, max_context_tokens=4096, max_new_tokens=24)
    engine = ModelEngine.load(
        str(demo_model_dir), device="cpu", dtype="float32", limits=ImageLimits(), options=options
    )
    mute_silent_ids(engine.model, demo_model_dir)
    seq = Sequence("a", engine.prepare([Turn.user("What is it?", [make_png(64, 64, (200, 30, 30))])]),
                   SamplingParams(24, min_new_tokens=24), 24)  # fmt: skip
    assert engine.reserve(seq)
    seq.tokens.extend(engine.prefill([seq]).tokens())
    for _ in range(23):
        seq.tokens.extend(engine.decode([seq]).tokens())
    assert not set(seq.tokens) & set(silent), seq.tokens
    assert all(engine.detokenize([token]) for token in seq.tokens)
