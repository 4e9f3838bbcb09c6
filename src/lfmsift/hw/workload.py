"""What one step of a streaming video LLM asks of the hardware: FLOPs and bytes per operation.

Pure arithmetic on model shapes. The paper's workload (§VI-A) is VideoLLM-online: Llama-3-8B with a
SigLIP-ViT-L-384 vision encoder, 10 visual tokens + 1 separator = 11 LLM tokens per frame (the digest's
§1.2-1.3, from the public VideoLLM-online code and the HF config). A frame step runs the vision encoder on
the frame and prefills its 11 tokens through every LLM layer (iterative prefill); a text step decodes one
token. Counts are per step for ``batch`` independent streams; weights are read once per step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    """FLOPs and device-memory bytes of one operation (bytes: weights or KV read, plus KV written)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class LLMShape:
    """A decoder-only LLM. Defaults are Llama-3-8B's config (digest §1.3)."""

    name: str = "Llama-3-8B"
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    value_bytes: int = 2  # BF16

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn_params(self) -> int:
        return 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim  # q, o + k, v

    @property
    def ffn_params(self) -> int:
        return 3 * self.hidden * self.ffn  # gate, up, down

    @property
    def layer_params(self) -> int:
        return self.attn_params + self.ffn_params

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden  # untied embedding + lm_head

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer, all KV heads (Llama-3-8B: 4 KiB; x 32 layers = 128 KiB)."""
        return 2 * self.kv_dim * self.value_bytes

    def qkv(self, rows: int) -> Work:
        params = self.hidden * (self.q_dim + 2 * self.kv_dim)
        return Work(2 * params * rows, params * self.value_bytes + rows * self.kv_bytes_per_token)

    def attention(self, rows: int, attended: float, streams: int = 1) -> Work:
        """Scores and weighted values over ``attended`` tokens per stream (``rows`` = all streams' rows);
        reads the attended K/V of every stream from device memory."""
        return Work(4 * rows * self.q_dim * attended, streams * attended * self.kv_bytes_per_token)

    def out_and_ffn(self, rows: int) -> Work:
        params = self.hidden * self.q_dim + self.ffn_params
        return Work(2 * params * rows, params * self.value_bytes)

    def lm_head(self, rows: int) -> Work:
        params = self.hidden * self.vocab
        return Work(2 * params * rows, params * self.value_bytes)

    def dense_step_flops(self, rows: int, cache: float, streams: int = 1) -> float:
        """FLOPs of one step with full attention over ``cache`` past tokens (the op count efficiency is
        measured in, the same for every method)."""
        per_stream = rows / streams
        layer = self.qkv(rows).flops + self.attention(rows, cache + per_stream, streams).flops
        layer += self.out_and_ffn(rows).flops
        return self.layers * layer + self.lm_head(streams).flops


@dataclass(frozen=True)
class VisionShape:
    """A ViT vision encoder; defaults are SigLIP-ViT-L/16 at 384 px (24 x 24 = 576 patches)."""

    name: str = "SigLIP-ViT-L-384"
    layers: int = 24
    hidden: int = 1024
    ffn: int = 4096
    patches: int = 576
    patch_size: int = 16
    channels: int = 3
    value_bytes: int = 2

    @property
    def params(self) -> int:
        per_layer = 4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn
        return self.layers * per_layer + self.channels * self.patch_size ** 2 * self.hidden

    def frames(self, count: int) -> Work:
        """Encode ``count`` frames: linear layers over every patch plus full self-attention."""
        n = self.patches
        linear = 2 * (self.params - self.channels * self.patch_size ** 2 * self.hidden) * n
        embed = 2 * self.channels * self.patch_size ** 2 * self.hidden * n
        attention = self.layers * 4 * n * n * self.hidden
        return Work(count * (linear + embed + attention), self.params * self.value_bytes)


LLAMA3_8B = LLMShape()
SIGLIP_L_384 = VisionShape()
TOKENS_PER_FRAME = 11  # 1 CLS + 3 x 3 pooled visual tokens + 1 separator (VideoLLM-online, digest §1.2)
