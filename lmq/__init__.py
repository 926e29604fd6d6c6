"""lmq: quantize LLMs to 4 bits, pack them for a GPU generation, run them with Triton kernels.

    import lmq
    llm = lmq.LLM("smollm2-awq")                      # a packed or portable 4-bit checkpoint
    out = llm.generate(["Hello"], lmq.SamplingParams(max_new_tokens=32))
    for update in llm.stream("Tell me a story"):     # text as it is produced
        print(update.delta, end="", flush=True)

The engine is imported on first use, so `import lmq` (and `lmq --help`) stays instant.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "ChatSession"]


def __getattr__(name: str):
    if name == "LLM":
        from lmq.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lmq.engine.sampling import SamplingParams

        return SamplingParams
    if name == "ChatSession":
        from lmq.engine.chat import ChatSession

        return ChatSession
    raise AttributeError(f"module 'lmq' has no attribute {name!r}")
