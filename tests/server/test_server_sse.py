"""SSE framing."""

from __future__ import annotations

import json

from server.api.sse import DONE_FRAME, sse_frame


def test_frame_is_one_data_line_and_a_blank_line():
    frame = sse_frame({"text": "line one\nline two", "zh": "你好"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2
    assert json.loads(frame[len(b"data: "):].decode()) == {"text": "line one\nline two", "zh": "你好"}
    assert "你好".encode() in frame  # UTF-8, not \\u escapes


def test_done_frame():
    assert DONE_FRAME == b"data: [DONE]\n\n"
