"""Python clients of bento-lmm (native API); LangChain models are in ``client.langchain``."""

from client.api import ClientError, EmbedResult, GenerateResult, RankResult, StreamEvent
from client.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "ClientError", "EmbedResult", "GenerateResult", "RankResult",
           "StreamEvent"]
