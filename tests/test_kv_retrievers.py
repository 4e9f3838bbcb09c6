"""The KV retrieval baselines: each selection on a small hand-checked case, the budgets held in real streams,
InfiniGen's speculative queries against the model's own."""

from __future__ import annotations

import math

import pytest
import torch

from lfmsift.kv import ReSV, TierBudget, get_retriever
from lfmsift.kv.cache import new_cache, uninstall
from lfmsift.kv.infinigen import InfiniGen, skew_and_columns, speculative_count
from lfmsift.kv.quest import Quest, QuestIndex, page_scores
from lfmsift.kv.rekv import ReKV, ReKVIndex, block_logits, top_blocks
from lfmsift.kv.streamingllm import StreamingLLM, sink_window_mask
from lfmsift.models.tiny import tiny_model


# -- hand-checked selections ------------------------------------------------------------------------------
def test_rekv_block_logits_and_top_blocks():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                    # 2 query heads
    reps = torch.tensor([[[1.0, 1.0]], [[2.0, -1.0]], [[0.0, 3.0]]])  # 3 blocks, 1 KV head
    logits = block_logits(q, reps)                                  # head 0 . rep + head 1 . rep
    assert logits.tolist() == [2.0, 1.0, 3.0]
    assert top_blocks(logits, 2).tolist() == [2, 0]
    index = ReKVIndex(ReKV(fraction=0.5), num_kv_heads=1)
    for rep in reps:                                                # one frame (block) per chunk
        index.assign(rep[:, None, :].expand(1, 4, 2))
    mask = index.select(q[:, None, :], "text")
    assert mask.tolist() == [[True, False, True]]                   # ceil(0.5 x 3) = 2 blocks
    assert ReKVIndex(ReKV(frame_retrieval=False), 1).select(q[:, None, :], "frame") is None
    # A question (several rows) retrieves once; its decode steps (one row) keep that choice.
    held = ReKVIndex(ReKV(fraction=0.3), 1)
    held.assign(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]))
    held.assign(torch.tensor([[[0.0, 1.0]]]))
    asked = held.select(torch.tensor([[[1.0, 0.0], [1.0, 0.1]]]), "text")
    assert asked.tolist() == [[True, False]]
    assert held.select(torch.tensor([[[0.0, 1.0]]]), "text") is asked
    fresh = ReKVIndex(ReKV(fraction=0.3, once_per_question=False), 1)
    fresh.representatives = list(held.representatives)
    fresh.select(torch.tensor([[[1.0, 0.0], [1.0, 0.1]]]), "text")
    assert fresh.select(torch.tensor([[[0.0, 1.0]]]), "text").tolist() == [[False, True]]
    split = ReKVIndex(ReKV(block_tokens=3), 1)
    assert split.assign(torch.zeros(1, 7, 2)).tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_quest_pages_bounds_and_budget():
    q = torch.tensor([[[1.0, -2.0]]])                               # 1 head, 1 row
    page_min = torch.tensor([[[0.0, 0.0], [-1.0, -1.0]]])
    page_max = torch.tensor([[[1.0, 1.0], [2.0, 3.0]]])
    # page 0: max(0, 1) + max(0, -2) = 1; page 1: max(-1, 2) + max(2, -6) = 4
    assert page_scores(q, page_min, page_max).tolist() == [[1.0, 4.0]]
    index = QuestIndex(Quest(page_size=4, budget=0.5, min_pages=1), num_kv_heads=1, head_dim=2)
    keys = torch.tensor([[[0.0, 5], [1, 4], [2, 3], [3, 2], [4, 1], [5, 0]]])
    assert index.assign(keys).tolist() == [0, 0, 0, 0, 1, 1]
    assert index.assign(keys[:, :3]).tolist() == [1, 1, 2]            # pages fill across chunks
    assert index.page_min[0, 0].tolist() == [0, 2] and index.page_max[0, 0].tolist() == [3, 5]
    assert index.page_min[0, 1].tolist() == [0, 0] and index.page_max[0, 1].tolist() == [5, 5]
    assert index.pages_kept() == 2                                   # ceil(0.5 x 9 / 4)
    mask = index.select(torch.tensor([[[1.0, 0.0]]]), "text")        # scores: max of dim 0 = 3, 5, 2
    assert mask.tolist() == [[True, True, False]]
    assert index.select(q, "frame") is None                          # dense while prefilling
    assert index.select(torch.zeros(1, 2, 2), "text") is None        # and for any chunk of > 1 query row
    by_tokens = QuestIndex(Quest(page_size=4, token_budget=8, min_pages=1), num_kv_heads=1, head_dim=2)
    by_tokens.assign(torch.cat([keys, keys[:, :3]], 1))
    assert by_tokens.pages_kept() == 2                               # min(9, 8) // 4 pages


def test_streamingllm_sinks_and_window():
    assert sink_window_mask(10, 2, 3).tolist() == [True, True, False, False, False, False, False, True, True, True]
    assert sink_window_mask(3, 4, 2).all()


def test_infinigen_skew_columns_and_count():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(200, 8, generator=gen) * torch.tensor([5.0, 0.1, 0.1, 3.0, 0.1, 0.1, 0.1, 0.1])
    skew, columns = skew_and_columns(queries, 0.25)
    assert torch.allclose(skew.T @ skew, torch.eye(8), atol=1e-5)   # orthogonal: q A . k A = q . k
    k = torch.randn(8, generator=gen)
    assert torch.dot(queries[0] @ skew, k @ skew) == pytest.approx(float(torch.dot(queries[0], k)), rel=1e-4)
    assert columns.numel() == 2                                      # ceil(0.25 x 8)
    share = (queries @ skew)[:, columns].abs().sum() / (queries @ skew).abs().sum()
    assert share > 0.8                                               # the two strong directions
    logits = torch.tensor([[10.0, 6.0, 4.9, 0.0], [3.0, 2.0, -5.0, -3.0]])
    assert speculative_count(logits, 5.0, cap=4) == 2                # head 0: 10, 6; head 1: 3, 2
    assert speculative_count(logits, 5.0, cap=1) == 1
    assert speculative_count(logits, 20.0, cap=3) == 3


def test_wicsum_score_modes_keep_the_order():
    from lfmsift.kv.wicsum import transform_scores, wicsum_select

    s = torch.tensor([[3.0, -1.0, 1.0, -3.0]])
    assert transform_scores(s, "shifted").tolist() == [[6.0, 2.0, 4.0, 0.0]]
    soft = transform_scores(s, "softmax", 1.0)
    assert soft[0, 0] == 1.0 and torch.equal(soft.argsort(), s.argsort())
    counts = torch.ones(4)
    # raw: total 0 -> the top cluster only; shifted: 0.3 x 12 = 3.6 -> 6 already exceeds it -> the top one;
    # 0.6 x 12 = 7.2 -> 6 + 4 -> two clusters
    assert wicsum_select(s, counts, 0.3).tolist() == [[True, False, False, False]]
    assert wicsum_select(transform_scores(s, "shifted"), counts, 0.6).tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="score_mode"):
        transform_scores(s, "log")


# -- in real streams --------------------------------------------------------------------------------------
def _stream(model, retriever, chunks=20, chunk=16, text_from=16, seed=1, text_chunk=None):
    """Frame chunks of ``chunk`` tokens, then text chunks of ``text_chunk`` (default ``chunk``) tokens."""
    ids = torch.randint(0, 250, (1, chunks * chunk), generator=torch.Generator().manual_seed(seed))
    cache = new_cache(model, retriever, TierBudget(device_bytes=20_000, host_bytes=10**6))
    try:
        with torch.no_grad():
            pos = 0
            for i in range(chunks):
                n = chunk if i < text_from or text_chunk is None else text_chunk
                cache.begin("frame" if i < text_from else "text")
                model(ids[:, pos : pos + n], past_key_values=cache)
                cache.end(n)
                pos += n
        return cache.stats()
    finally:
        uninstall(cache)
        cache.close()


def _allowed(index) -> int:
    """The most groups a retriever may select now, by its own budget rule."""
    c = index.config
    if isinstance(c, ReKV):
        return max(1, math.ceil(c.fraction * len(index.representatives)))
    if isinstance(c, Quest):
        return max(c.min_pages, math.ceil(c.budget * index.tokens / c.page_size))
    if isinstance(c, StreamingLLM):
        return c.sinks + c.window
    return max(1, math.ceil(c.budget * index.tokens))  # InfiniGen


@pytest.mark.parametrize("name, options", [
    ("rekv", {"fraction": 0.25, "block_tokens": 8}),
    ("quest", {"budget": 0.3, "page_size": 8, "min_pages": 1, "dense_layers": 1, "prefill": True}),
    ("streamingllm", {"sinks": 4, "window": 40}),
    ("infinigen_p", {"budget": 0.2, "calibration_rows": 16}),
])
def test_every_retriever_respects_its_budget(name, options, monkeypatch):
    model = tiny_model("gemma3_text", seed=0, dtype=torch.float32)
    retriever = get_retriever(name, **options)
    checked = []
    make_index = retriever.index

    def index(*args, **kwargs):
        idx = make_index(*args, **kwargs)
        select = idx.select

        def checked_select(*a, **k):
            mask = select(*a, **k)
            if mask is not None and mask.shape[1]:
                assert int(mask.sum(1).max()) <= _allowed(idx), (name, int(mask.sum(1).max()), _allowed(idx))
                checked.append(float(mask.float().mean()))
            return mask

        if hasattr(idx, "config"):
            idx.select = checked_select
        return idx

    monkeypatch.setattr(retriever, "index", index)
    stats = _stream(model, retriever)
    assert len(checked) > 10 and min(checked) < 1.0
    assert 0 < stats["text_stage"]["retrieval_ratio"] < 1
    assert 0 < stats["frame_stage"]["retrieval_ratio"] < 1


def test_quest_and_infinigen_keep_prefill_dense():
    model = tiny_model("gemma3_text", seed=0, dtype=torch.float32)
    assert _stream(model, Quest(budget=0.3))["frame_stage"]["retrieval_ratio"] == 1.0
    assert _stream(model, InfiniGen(budget=0.3, calibration_rows=16))["frame_stage"]["retrieval_ratio"] == 1.0
    # A question (text chunk of many rows) is dense too; decode steps (one row each) select.
    for retriever in (Quest(budget=0.3, dense_layers=0), InfiniGen(budget=0.3, calibration_rows=16)):
        assert _stream(model, retriever)["text_stage"]["retrieval_ratio"] == 1.0
        assert _stream(model, retriever, text_chunk=1)["text_stage"]["retrieval_ratio"] < 1.0


def test_infinigen_offline_calibration_fixes_the_skew_before_the_stream():
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    retriever = InfiniGen(budget=0.3, calibration_rows=10**6)  # never calibrates on the stream itself
    assert _stream(model, retriever, text_chunk=1)["text_stage"]["retrieval_ratio"] == 1.0
    words = " ".join(f"w{i}" for i in range(200))
    tokenizer = lambda text, add_special_tokens=False: {"input_ids": [hash(w) % 250 for w in text.split()]}  # noqa: E731
    retriever.calibrate(model, tokenizer, words, tokens=64)
    heads = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, (skew, cols) in retriever._calibration.items():
        # the skew is the right singular basis of the layer's 64 query rows per KV head: orthogonal
        assert torch.allclose(skew[0] @ skew[0].T, torch.eye(skew.shape[-1]), atol=1e-4)
        assert cols.shape[-1] == math.ceil(0.2 * skew.shape[-1]) and heads >= 1
    assert len(retriever._calibration) == model.config.num_hidden_layers
    assert _stream(model, retriever, text_chunk=1)["text_stage"]["retrieval_ratio"] < 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_speculative_queries_match_the_model_own(arch):
    """Fed a layer's own attention input, the speculation path reproduces that layer's queries exactly
    (projection, query norm, RoPE), so InfiniGen's hint differs only by using the previous layer's input."""
    model = tiny_model(arch, seed=0, dtype=torch.float32)
    cache = new_cache(model, InfiniGen(calibration_rows=4))
    seen = {}
    original = cache.attend

    def spy(module, query, key, value, scaling):
        layer = module.layer_idx
        seen[layer] = (query[0].clone(), cache.project_query(cache._attn_inputs[layer][0], layer))
        return original(module, query, key, value, scaling)

    cache.attend = spy
    try:
        with torch.no_grad():
            for start in (0, 12):
                cache.begin("frame")
                model(torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(start)),
                      past_key_values=cache)
                cache.end(12)
    finally:
        uninstall(cache)
        cache.close()
    assert seen
    for layer, (actual, projected) in seen.items():
        assert torch.allclose(actual, projected, atol=1e-5), (layer, (actual - projected).abs().max())


def test_bad_options_fail_clearly():
    for make in (lambda: ReKV(fraction=0.0), lambda: ReKV(topk=0), lambda: Quest(budget=1.5),
                 lambda: StreamingLLM(window=-1), lambda: InfiniGen(budget=0.0),
                 lambda: InfiniGen(selection="previous_layer"), lambda: ReSV(score_mode="log")):
        with pytest.raises(ValueError):
            make()
    assert math.isclose(ReKV().fraction, 0.5)
