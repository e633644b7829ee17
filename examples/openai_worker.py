"""A worker whose tokens come from an OpenAI-compatible server (``/v1/chat/completions``).

Without arguments the upstream is a second, built-in tiny worker (workers also answer
``POST /v1/chat/completions`` with ``stream: true``), so the example runs anywhere. Point
it at llama.cpp's server, vLLM or Ollama instead with ``--upstream http://host:port``
(and ``--model`` the name that server knows).

Run: ``python examples/openai_worker.py [--upstream URL --model NAME] [--prompt TEXT]``
"""

from __future__ import annotations

import argparse
import sys

import trio

from servers.worker import WorkerConfig, build_app
from trio_jobs import JobClient, NarrationEvent
from trio_jobs.http import serve


async def main(upstream: str | None, model: str, prompt: str) -> None:
    async with trio.open_nursery() as nursery:
        if upstream is None:
            tiny_app, _ = build_app(WorkerConfig(worker_id="upstream", model=model))
            upstream = await nursery.start(serve, tiny_app)
            print(f"upstream: a tiny worker on {upstream}")
        config = WorkerConfig(
            worker_id="proxy", model=model, backend="openai", upstream_url=upstream
        )
        app, _ = build_app(config)
        worker_url = await nursery.start(serve, app)
        print(f"worker (openai backend) on {worker_url}")
        async with JobClient(worker_url) as client:
            body = {"operation": "infer", "model": model, "prompt": prompt, "max_tokens": 16}
            job_id = await client.submit(body, timeout_s=60)
            async with client.stream(job_id) as stream:
                async for item in stream:
                    if isinstance(item, NarrationEvent):
                        if item.action == "token":
                            sys.stdout.write(str(item.fields["token"]))
                            sys.stdout.flush()
                        elif item.action == "infer_complete":
                            print(f"\n{item.human}")
                    else:
                        print(item.wire)
                stream.check()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", default=None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt", default="Tell me about trio")
    args = parser.parse_args()
    trio.run(main, args.upstream, args.model, args.prompt)
