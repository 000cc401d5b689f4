"""Knowledge bases: documents parsed, chunked, embedded and stored in Milvus, then retrieved."""


class RagError(Exception):
    """Bad input or a missing knowledge base: the message is meant for the caller."""

    def __init__(
        self, message: str, *, status: int = 400, code: str = "invalid_request",
        param: str | None = None, retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # the request field at fault, when there is one
        self.retry_after_s = retry_after_s  # a 503's Retry-After


def too_much_text(name: str, extracted: int, limit: int) -> RagError:
    return RagError(f"{name}: {extracted} characters of text, over the limit of {limit} "
                    "(rag.max_extracted_chars).", status=413, code="too_much_text")
