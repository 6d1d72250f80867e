"""Python clients of bento-lmm (native API); LangChain models are in ``client.langchain``."""

from client.client import (
    AsyncClient,
    Client,
    ClientError,
    EmbedResult,
    GenerateResult,
    StreamEvent,
)

__all__ = ["AsyncClient", "Client", "ClientError", "EmbedResult", "GenerateResult", "StreamEvent"]
