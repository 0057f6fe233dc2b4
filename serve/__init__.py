"""serve: running models. The top layer: the `press` command lives here (cli.py).

  cli            the `press` dispatcher, the only module that imports every command
  commands/      generate, batch, serve, ask, eval: typed configs, arguments and jobs
  engine         the jit-compiled KV-cache engine: continuous batching, streaming, cancel
  sampling       SamplingParams and the sampler
  speculative    speculative decoding: a draft model proposes, the target checks K + 1 tokens in one pass
  batch          offline JSONL jobs, resumable
  server         the OpenAI-compatible HTTP server; openai_protocol validates its requests
  rag            grounded answers: retrieve, number the sources, generate, cite
  decode_speed   batch-1 decode speed through the engine (press eval, benchmarks)

  from serve import Engine, SamplingParams
  with Engine.from_pretrained("smollm2-135m-instruct") as engine:
      print(engine.generate("The capital of France is", SamplingParams(max_new_tokens=8))[0].text)
"""

from serve.engine import Engine, Request, RequestOutput
from serve.rag import Answer, RagPipeline, Source
from serve.sampling import SamplingParams

__all__ = ["Engine", "Request", "RequestOutput", "Answer", "RagPipeline", "Source", "SamplingParams"]
