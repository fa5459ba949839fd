"""llmserve: an LLM serving engine."""
from llmserve.outputs import CompletionOutput, RequestOutput
from llmserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it lazily so `import llmserve` stays light.
    if name == "LLM":
        from llmserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
