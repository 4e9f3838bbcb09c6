"""Video decoding and the streaming session on real data and the real SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

from lfmsift.stream import StreamingSession, VideoError, chat_parts, frames


def test_frames_sample_real_video_at_fps(data_dir):
    clip = data_dir / "video" / "vtest.avi"  # 795 frames at 10 fps
    sampled = list(frames(clip, fps=2, size=128))
    assert len(sampled) == 159
    assert [round(f.time, 2) for f in sampled[:4]] == [0.0, 0.5, 1.0, 1.5]
    assert sampled[0].image.size == (128, 96) and sampled[0].image.mode == "RGB"
    assert len(list(frames(clip, fps=None, max_frames=7))) == 7


def test_frames_errors_are_clear(tmp_path, data_dir):
    with pytest.raises(VideoError, match="not found"):
        next(frames(tmp_path / "missing.mp4"))
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="cannot open"):
        next(frames(empty))
    corrupt = tmp_path / "corrupt.avi"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    with pytest.raises(VideoError):
        next(frames(corrupt))
    with pytest.raises(ValueError, match="fps"):
        next(frames(data_dir / "video" / "vtest.avi", fps=0))


@pytest.mark.real
def test_full_retrieval_session_generates_like_the_plain_model(smollm2, data_dir):
    """Everything fetched through the tiers (offloaded to host and disk) = plain greedy decoding."""
    from lfmsift.kv import TierBudget

    model, tok = smollm2
    text = (data_dir / "text" / "wikitext2_test.txt").read_text()[:3000]
    chunks = [text[i : i + 500] for i in range(0, len(text), 500)]
    budget = TierBudget(device_bytes=12 << 20, host_bytes=8 << 20)
    with StreamingSession(model, tok, retriever="full", budget=budget) as session:
        for chunk in chunks:
            session.feed(chunk)
        answer = session.ask("Who is the text about?", max_new_tokens=12)
        stats = session.stats()
    assert stats["store"]["bytes"]["disk"] > 0 and stats["store"]["bytes"]["host"] > 0
    parts = chat_parts(tok)
    ids = tok(parts.preamble, add_special_tokens=False)["input_ids"]
    for chunk in chunks:
        ids += tok(chunk, add_special_tokens=False)["input_ids"]
    ids += tok("Who is the text about?" + parts.answer_open, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert answer.token_ids == out[0, len(ids):].tolist()[: len(answer.token_ids)]


@pytest.mark.real
def test_resv_session_follow_up_and_stats(smollm2, data_dir):
    model, tok = smollm2
    text = (data_dir / "text" / "wikitext2_test.txt").read_text()[:2400]
    with StreamingSession(model, tok, retriever="resv") as session:
        for i in range(0, len(text), 400):
            session.feed(text[i : i + 400])
        first = session.ask("What is this about?", max_new_tokens=8)
        second = session.ask("Say it again.", max_new_tokens=8)
        stats = session.stats()
        with pytest.raises(TypeError, match="takes no images"):
            session.feed(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
        with pytest.raises(ValueError, match="empty question"):
            session.ask("  ")
    assert first.token_ids and second.token_ids
    assert 0 < stats["frame_stage"]["retrieval_ratio"] < 1
    assert 0 < stats["text_stage"]["retrieval_ratio"] < 1
    assert len(stats["frame_stage"]["layers"]) == model.config.num_hidden_layers
    assert stats["index"]["tokens_per_cluster"] > 1


def test_stream_cli_fails_fast_on_a_missing_video(tmp_path):
    from typer.testing import CliRunner

    from lfmsift.cli import app

    result = CliRunner().invoke(app, ["stream", str(tmp_path / "missing.mp4"), "--ask", "hi"])
    assert result.exit_code == 2 and "not found" in result.output


@pytest.mark.real
def test_stream_cli_on_a_text_file(smollm2, data_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from lfmsift.cli import app

    doc = tmp_path / "doc.txt"
    doc.write_text((data_dir / "text" / "wikitext2_test.txt").read_text()[:4000])
    out = tmp_path / "stream.json"
    result = CliRunner().invoke(app, ["stream", str(doc), "--model", "smollm2-135m", "--chunk-tokens", "128",
                                      "--ask", "What is it about?", "--max-new-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["answers"][0]["tokens"] >= 1
    assert 0 < record["stats"]["frame_stage"]["retrieval_ratio"] < 1
    result = CliRunner().invoke(app, ["stream", str(doc), "--model", "smollm2-135m", "--device-bytes", "1K"])
    assert result.exit_code == 2 and "device budget" in result.output
    # the device path from the CLI (run eagerly on the CPU here): the same kind of record, its path named
    result = CliRunner().invoke(app, ["stream", str(doc), "--model", "smollm2-135m", "--chunk-tokens", "128",
                                      "--cache-path", "device", "--device-bytes", "16M", "--ask", "What is it about?",
                                      "--max-new-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["stats"]["path"] == "device" and record["answers"][0]["tokens"] >= 1
    assert record["stats"]["store"]["bytes"]["host"] > 0 and record["stats"]["store"]["moved_bytes"]["fetched_host"] > 0
    # --graphs: the same stream as prepared steps (eager here), the same answer
    result = CliRunner().invoke(app, ["stream", str(doc), "--model", "smollm2-135m", "--chunk-tokens", "128",
                                      "--cache-path", "device", "--device-bytes", "16M", "--ask", "What is it about?",
                                      "--max-new-tokens", "4", "--graphs", "--json", str(tmp_path / "graphs.json")])
    assert result.exit_code == 0, result.output
    graphed = json.loads((tmp_path / "graphs.json").read_text())["answers"]
    assert [(a["answer"], a["tokens"]) for a in graphed] == [(a["answer"], a["tokens"]) for a in record["answers"]]
    result = CliRunner().invoke(app, ["stream", str(doc), "--model", "smollm2-135m", "--cache-path", "device",
                                      "--disk-bytes", "1G"])
    assert result.exit_code == 2 and "no disk tier" in result.output


@pytest.mark.real
def test_smolvlm_around_smollm2_matches_it_on_text_and_streams_real_frames(smollm2, data_dir):
    from lfmsift.models.vlm import smolvlm_from_text_model

    text_model, tok = smollm2
    vlm, processor = smolvlm_from_text_model(text_model, tok, vision={"image_size": 256})
    ids = tok("The Eiffel tower is in", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = text_model(ids).logits
        got = vlm(input_ids=ids).logits[..., : expected.shape[-1]]
    # The same weights and ops; fp32 summation order may differ between transformers releases.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    with pytest.raises(ValueError, match="markers"):
        processor(text="<image><image>", images=[])
    clip = list(frames(data_dir / "video" / "vtest.avi", fps=2, max_frames=3))
    with StreamingSession(vlm, processor, retriever="resv") as session:
        tokens = [session.feed(frame) for frame in clip]
        answer = session.ask("What do you see?", max_new_tokens=4)
        stats = session.stats()
    assert tokens == [16 + 3] * 3  # 256 px, patch 16, pixel shuffle 4: 16 image tokens + 3 wrapper tokens
    assert stats["session"]["frames"] == 3 and answer.token_ids
    assert 0 < stats["frame_stage"]["retrieval_ratio"] <= 1


@pytest.mark.real
@pytest.mark.parametrize("options", [{"buckets": 20}, {"selection": "previous_layer", "nonpositive": "shifted"}])
def test_device_path_selects_the_reference_tokens_on_a_real_model_stream(smollm2, data_dir, options):
    """The device streaming path (run here on the CPU, eagerly) against the reference cache on SmolLM2 and
    WikiText-2: the same tokens per layer, KV head and chunk, the same greedy answer."""
    from lfmsift.kv import ReSV

    model, tok = smollm2
    text = (data_dir / "text" / "wikitext2_test.txt").read_text()[:2000]
    results = {}
    for path in ("reference", "device"):
        with StreamingSession(model, tok, retriever=ReSV(**options), cache_path=path) as session:
            session.cache.trace = []
            for i in range(0, len(text), 400):
                session.feed(text[i : i + 400])
            answer = session.ask("What is this about?", max_new_tokens=6)
            results[path] = (session.cache.trace, answer.token_ids, session.stats())
    (want_trace, want_ids, want_stats), (trace, ids, stats) = results["reference"], results["device"]
    assert stats["path"] == "device" and len(trace) == len(want_trace)
    for (layer, stage, keep), (want_layer, want_stage, want_keep) in zip(trace, want_trace):
        assert (layer, stage) == (want_layer, want_stage) and torch.equal(keep.cpu(), want_keep)
    assert ids == want_ids
    assert stats["frame_stage"]["retrieval_ratio"] == pytest.approx(want_stats["frame_stage"]["retrieval_ratio"])
    assert 0 < stats["frame_stage"]["retrieval_ratio"] < 1


@pytest.mark.real
def test_a_session_of_prepared_steps_answers_as_the_per_chunk_device_path(smollm2, data_dir):
    """``graphs=True`` (the prepared steps CUDA graphs replay; eager here on the CPU) against the device
    path's per-chunk steps on SmolLM2 and WikiText-2, with a device window so that older tokens are read
    from the host tier: the same greedy answer and retrieval ratios."""
    from lfmsift.kv import ReSV, TierBudget

    model, tok = smollm2
    cfg = model.config
    token_bytes = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    budget = TierBudget(device_bytes=256 * token_bytes * cfg.num_hidden_layers)
    text = (data_dir / "text" / "wikitext2_test.txt").read_text()[:2000]
    results = {}
    for graphs in (False, True):
        with StreamingSession(model, tok, retriever=ReSV(buckets=20), budget=budget, cache_path="device",
                              graphs=graphs) as session:
            for i in range(0, len(text), 400):
                session.feed(text[i : i + 400])
            answer = session.ask("What is this about?", max_new_tokens=6)
            results[graphs] = (answer.token_ids, session.stats())
    (want_ids, want_stats), (ids, stats) = results[False], results[True]
    assert ids == want_ids
    assert stats["store"]["bytes"]["host"] > 0
    for stage in ("frame_stage", "text_stage"):
        assert stats[stage]["retrieval_ratio"] == pytest.approx(want_stats[stage]["retrieval_ratio"])
    with pytest.raises(ValueError, match="device path"):
        StreamingSession(model, tok, cache_path="reference", graphs=True)
