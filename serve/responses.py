"""The answers of serve/server.py in the OpenAI API's shapes: a whole completion (``completion_body``) or a
stream of server-sent events (``stream``), with logprobs and the server's own measurements."""

from __future__ import annotations

import asyncio
import json
import threading

from fastapi.responses import StreamingResponse

from common.cli import failure
from runtime.loop import ClientGone
from serve.api import (
    ApiError,
    ChatChoice,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChoice,
    Sampling,
    StreamChunk,
    Usage,
    new_id,
    now,
)
from serve.engine import RunResult, run, usage
from serve.plan import Plan
from serve.served import Served


def _completion_logprobs(entries: list[dict]) -> dict:
    """OpenAI's completion logprobs; ``text_offset``: where each token's text begins in the completion's text (in
    a stream too: counted from the completion's start, not the chunk's)."""
    offsets = [e["offset"] for e in entries]
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        # two alternatives may read the same (broken bytes): the likelier one keeps the key
        "top_logprobs": [dict(reversed(e["top"])) for e in entries],
        "text_offset": offsets,
    }


async def ready(queue: asyncio.Queue) -> list:
    """Every event ready now (at least one, waited for): a batch step readies several at once, and they go out
    in one write."""
    events = [await queue.get()]
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


def _chat_logprobs(entries: list[dict]) -> dict:
    def one(t, lp):
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {
        "content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, v) for t, v in e["top"]]} for e in entries]
    }


def completion_body(served: Served, plan: Plan, result: RunResult, chat: bool) -> dict:
    """The whole answer, typed as the OpenAI API's (serve/api.py), with the server's measurements beside."""
    several = len(result.choices) > 1
    wanted = plan.how.logprobs is not None
    choices = []
    for c in result.choices:
        metrics = c.metrics() if several else None
        common = {"index": c.index, "finish_reason": c.finish_reason, "metrics": metrics}
        if chat:
            lp = _chat_logprobs(c.logprobs) if wanted else None
            choices.append(ChatChoice(message=ChatMessage(content=c.text), logprobs=lp, **common))
        else:
            lp = CompletionLogprobs(**_completion_logprobs(c.logprobs)) if wanted else None
            choices.append(CompletionChoice(text=c.text, logprobs=lp, **common))
    kind = ChatCompletionResponse if chat else CompletionResponse
    answer = kind(
        id=new_id("chatcmpl" if chat else "cmpl"),
        created=now(),
        model=plan.model or served.name,
        choices=choices,
        usage=Usage(**usage(plan, result.measures)),
        **result.measures.to_json(),
    )
    return answer.model_dump()


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def stream(served: Served, plan: Plan, req: Sampling, chat: bool) -> StreamingResponse:
    """The answer as server-sent events: a chunk per token (its text may be empty while a possible stop string
    or an incomplete character is held back), a last chunk per choice with its finish reason, then the
    measurements (with ``usage`` when ``stream_options.include_usage``), then ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    running = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    prompt_tokens = sum(len(p) for p in plan.prompts)

    def emit(event):
        if gone.is_set():
            raise ClientGone
        loop.call_soon_threadsafe(queue.put_nowait, event)

    def chunk(choices: list, **extra) -> dict:
        # with include_usage, every chunk but the usage one says "usage": null (the OpenAI spec)
        c = StreamChunk(id=rid, object=kind, created=created, model=plan.model or served.name, choices=choices, **extra)
        return c.dump(include_usage)

    def choice(index: int, delta: str, finish: str | None, released: list[dict]):
        if chat:
            lp = _chat_logprobs(released) if released else None
            content = ChatDelta(content=delta if delta or finish is None else None)
            return ChatStreamChoice(index=index, delta=content, logprobs=lp, finish_reason=finish)
        lp = CompletionLogprobs(**_completion_logprobs(released)) if released else None
        return CompletionStreamChoice(index=index, text=delta, logprobs=lp, finish_reason=finish)

    async def events():
        task = asyncio.ensure_future(loop.run_in_executor(served.requests, run, served, plan, emit))
        task.add_done_callback(lambda t: queue.put_nowait(None) or t.cancelled() or t.exception())
        try:
            if chat:
                first = ChatDelta(role="assistant", content="")
                yield sse(chunk([ChatStreamChoice(index=i, delta=first) for i in range(len(plan.choices))]))
            n_out, ended, last, done = 0, 0, None, False
            while not done:
                out = []
                for event in await ready(queue):
                    if event is None:
                        done = True
                        break
                    n_out += event.kind in ("token", "last")  # "last": a choice's last token, with its finish
                    ended += event.kind in ("end", "last")
                    so_far = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out}
                    so_far = {"usage": Usage(**so_far, total_tokens=prompt_tokens + n_out)} if running else {}
                    one = [choice(event.index, event.delta, event.finish, event.logprobs)]
                    if event.kind == "token":
                        out.append(sse(chunk(one, **so_far)))
                    elif ended == len(plan.choices):  # choices of a batch end in any order: the last to end
                        last = (one, so_far)  # sent with the measures
                    else:
                        out.append(sse(chunk(one, **so_far)))
                if out:
                    yield b"".join(out)
            try:
                result = task.result()
            except Exception as e:  # after the first byte the status is sent: the error goes in the stream
                if last is not None:
                    yield sse(chunk(last[0], **last[1]))
                yield sse(ApiError(500, f"decoding failed: {failure(e, 200)}").body())
            else:
                # The server's own figures ride on the last chunk: the usage chunk (choices empty) when usage
                # was asked for, else the last choice's final chunk, so no empty-choices chunk is sent unasked.
                measures = result.measures
                if include_usage:
                    if last is not None:
                        yield sse(chunk(last[0], **last[1]))
                    yield sse(chunk([], usage=Usage(**usage(plan, measures)), **measures.to_json()))
                elif last is not None:
                    yield sse(chunk(last[0], **(last[1] | measures.to_json())))
            yield sse(b"[DONE]")
        finally:
            gone.set()  # however the stream ends (the client may have left), the decoding stops

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
