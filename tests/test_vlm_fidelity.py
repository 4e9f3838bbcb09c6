"""POP on a VLM's language decoder with real frames and images; the fidelity metrics themselves."""

import pytest
import torch

from lfmsift.eval import fidelity
from lfmsift.eval.vision_samples import sample_image, video_clips, vision_samples
from lfmsift.prune import pruned
from lfmsift.stream.video import VideoError


def test_kl_divergence_hand_case():
    p = torch.log(torch.tensor([[0.5, 0.5], [1.0, 1e-30]]))
    q = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    expected = [0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3)), torch.log(torch.tensor(2.0))]
    torch.testing.assert_close(fidelity.kl_divergence(p, q).float(), torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert fidelity.kl_divergence(p, p).abs().max() < 1e-12


def test_teacher_forced_decode_matches_greedy_on_text(smollm2):
    model, tok = smollm2
    inputs = dict(tok("The capital of France is", return_tensors="pt"))
    tokens, logprobs = fidelity.decode(model, inputs, 6)
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert tokens.tolist() == generated[0, inputs["input_ids"].shape[1]:].tolist()
    forced, forced_lp = fidelity.decode(model, inputs, 6, forced=tokens)
    assert torch.equal(forced, tokens)
    torch.testing.assert_close(forced_lp, logprobs, rtol=0, atol=0)
    ref = fidelity.Reference([tokens], [logprobs])
    same = fidelity.measure(model, [inputs], ref)
    assert same.kl == 0 and same.top1 == 1 and same.exact_match == 1 and same.prefix == 1
    with pytest.raises(ValueError, match="batch size 1"):
        fidelity.decode(model, dict(tok(["a", "b"], return_tensors="pt")), 2)


def test_video_clips_and_errors(data_dir, tmp_path):
    clips = video_clips(data_dir / "video" / "vtest.avi", clips=2, frames_per_clip=3, fps=1.0)
    assert [len(c) for c in clips] == [3, 3]
    with pytest.raises(ValueError, match="need more"):
        video_clips(data_dir / "video" / "vtest.avi", clips=1000, frames_per_clip=10, fps=1.0)
    with pytest.raises(VideoError):
        video_clips(tmp_path / "missing.avi", 1, 1)
    assert sample_image().is_file()


@pytest.mark.real
def test_pop_on_vlm_decoder_with_real_frames(smollm2, data_dir):
    """Image tokens are part of the prefill that partitions; ratio 0 is exact; 20% differs but stays close."""
    from lfmsift.models.vlm import smolvlm_from_text_model

    vlm, processor = smolvlm_from_text_model(*smollm2, vision={"image_size": 256})
    samples = vision_samples(processor, data_dir / "video" / "vtest.avi", (sample_image(),), clips=1,
                             frames_per_clip=2)
    assert [s.name for s in samples] == ["vtest.avi#clip0", "grace_hopper.jpg#q0", "grace_hopper.jpg#q1"]
    assert samples[0].inputs["pixel_values"].shape[0] == 2 and samples[1].inputs["pixel_values"].shape[0] == 1
    samples = samples[:2]  # one clip of two real frames, one real photograph
    inputs = [s.inputs for s in samples]
    ref = fidelity.reference(vlm, inputs, 6)
    with pruned(vlm, "pop", ffn_ratio=0.0, gamma=0.0):
        exact = fidelity.measure(vlm, inputs, ref)
    assert exact.kl < 1e-5 and exact.top1 == 1 and exact.exact_match == 1
    with pruned(vlm, "pop", target=0.2) as handle:
        first = samples[0].inputs["input_ids"].shape[1]
        fidelity.decode(vlm, samples[0].inputs, 4)
        total = handle.stats()["total"]
        assert total["prefill_tokens"] == first  # 2 frames x (16 image + 3 wrapper tokens) + text
        assert total["decode_steps"] == 3 and total["decode_flops_vs_dense"] < 0.85
        pruned_result = fidelity.measure(vlm, inputs, ref)
    assert 0 < pruned_result.kl < 5 and pruned_result.kl_decode is not None
