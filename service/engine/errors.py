"""Engine errors. Each carries the status a caller should map it to; the engine itself knows no HTTP."""


class EngineError(Exception):
    code = 500
    type = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(EngineError):
    code, type = 422, "invalid_request"


class UnknownModel(EngineError):
    code, type = 404, "model_not_found"


class Overloaded(EngineError):
    code, type = 429, "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(EngineError):
    code, type = 503, "not_ready"


class DeadlineExceeded(EngineError):
    code, type = 504, "deadline_exceeded"


class BatchFailed(EngineError):
    code, type = 500, "internal_error"
