"""OpenAI response and stream-chunk bodies. Pure."""

from __future__ import annotations

import json
import time

from magnus.v1 import generation_pb2
from services.gateway.requests import Job


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def magnus_extension(result: generation_pb2.GenerateResponse | None, request_id: str, predicted_tokens: int) -> dict:
    """Extension field `magnus`: the predicted length and where the request ran."""
    extension = {"request_id": request_id, "predicted_tokens": predicted_tokens}
    if result is not None:
        extension.update(
            batch_id=result.batch_id, batch_size=result.batch_size, is_prediction_fallback=result.is_prediction_fallback,
            queue_wait_s=round(result.timings.queue_wait_s, 6), run_s=round(result.timings.run_s, 6),
        )
    return extension


def finish_reason(job: Job, generated_tokens: int, is_stopped: bool) -> str:
    return "length" if not is_stopped and generated_tokens >= job.max_tokens else "stop"


def completion_id(job: Job, request_id: str) -> str:
    return f"{'chatcmpl' if job.is_chat else 'cmpl'}-{request_id}"


def full_response(job: Job, request_id: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int,
                  extension: dict) -> dict:
    if job.is_chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {
        "id": completion_id(job, request_id), "object": "chat.completion" if job.is_chat else "text_completion",
        "created": int(time.time()), "model": job.model, "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens), "magnus": extension,
    }


class ChunkWriter:
    """Server-sent events of one streamed answer: `data: {chunk}` lines, then `data: [DONE]`."""

    def __init__(self, job: Job, request_id: str) -> None:
        self.job = job
        self.id = completion_id(job, request_id)
        self.created = int(time.time())

    def _event(self, payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(self, text: str | None, reason: str | None = None, **extra) -> str:
        if self.job.is_chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return self._event({"id": self.id, "object": kind, "created": self.created, "model": self.job.model,
                            "choices": [choice], **extra})

    def role(self) -> str:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        return self._event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.job.model,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]})

    def error(self, body: dict) -> str:
        return self._event(body)

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
