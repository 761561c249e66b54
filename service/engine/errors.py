"""Engine errors. Each carries the status a caller should map it to; the engine itself knows no HTTP."""


class EngineError(Exception):
    code = 500
    type = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(EngineError):
    code = 422
    type = "invalid_request"


class UnknownModel(EngineError):
    code = 404
    type = "model_not_found"


class Overloaded(EngineError):
    code = 429
    type = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(EngineError):
    code = 503
    type = "not_ready"


class DeadlineExceeded(EngineError):
    code = 504
    type = "deadline_exceeded"


class BatchFailed(EngineError):
    code = 500
    type = "internal_error"
