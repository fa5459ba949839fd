"""Typed errors. Messages name files, fields and sizes; never prompt or output content."""


class LLMServeError(Exception):
    """Base class of every error llmserve raises on purpose."""


class ModelLoadError(LLMServeError):
    """A model could not be loaded: missing file, corrupt header, unsupported tensor type."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one llmserve implements."""


class InvalidRequestError(LLMServeError, ValueError):
    """A request is malformed: bad sampling parameters, empty prompt, token id out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens it asks for) does not fit the model's context."""


class EngineDeadError(LLMServeError):
    """The engine loop has stopped and can serve no more requests."""


class EngineStepError(LLMServeError):
    """An engine step failed (a device or kernel error); the requests in it were ended. The engine
    itself goes on serving, so the caller may retry."""
