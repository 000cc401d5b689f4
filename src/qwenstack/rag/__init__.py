"""Knowledge bases: documents parsed, chunked, embedded and stored in Milvus, then retrieved."""


class RagError(Exception):
    """Bad input or a missing knowledge base: the message is meant for the caller."""

    def __init__(
        self, message: str, *, status: int = 400, code: str = "invalid_request",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # the request field at fault, when there is one
