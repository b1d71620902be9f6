"""Generation: one engine (prefill + decode over a KV cache, continuous batching, streaming), sampling, chat."""

from litft.generate.engine import Engine, Request
from litft.generate.sampling import SamplingParams

__all__ = ["Engine", "Request", "SamplingParams"]
