"""Streaming sessions over real video (or long text): iterative prefill, retrieval, questions."""

from lfmsift.stream.session import Answer, StreamingSession, chat_parts
from lfmsift.stream.video import Frame, VideoError, frames

__all__ = ["Answer", "Frame", "StreamingSession", "VideoError", "chat_parts", "frames"]
