"""The OpenAI-compatible routes (mounted at ``/v1``): a thin FastAPI router over
``lmm.serving.OpenAIServing``, which the service builds and hands to the app at startup
(``app.state.serving``). Errors take the one shape of ``lmm.errors``."""

from __future__ import annotations

from typing import Any

from bentoml.exceptions import BentoMLException
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmm import openai_protocol as oai
from lmm.errors import NotFoundError, error_body, json_error, validation_error
from lmm.serving import OpenAIServing

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": oai.ErrorResponse, "description": meaning}
    for status, meaning in ((400, "Invalid request"), (404, "Unknown model"),
                            (413, "Image too large"), (500, "Server error"))}


def serving(request: Request) -> OpenAIServing:
    found = getattr(request.app.state, "serving", None)
    if found is None:
        raise HTTPException(503, "the service is starting; retry shortly")
    return found


def _respond(result: Any) -> Any:
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return result


@router.get("/models", response_model=oai.ModelList, tags=["OpenAI: models"])
async def list_models(s: OpenAIServing = Depends(serving)) -> oai.ModelList:
    """The served chat models (the LLM and its LoRA adapters) and the embedding model."""
    return s.models()


@router.get("/models/{model_id}", response_model=oai.ModelCard, tags=["OpenAI: models"],
            responses=_ERRORS)
async def get_model(model_id: str, s: OpenAIServing = Depends(serving)) -> oai.ModelCard:
    """One served model."""
    return s.model(model_id, embedding=True).openai()


@router.post("/chat/completions", response_model=oai.ChatCompletion, responses=_ERRORS,
             tags=["OpenAI: chat"])
async def chat_completions(request: oai.ChatCompletionRequest,
                           s: OpenAIServing = Depends(serving)) -> Any:
    """Chat with text and images; `stream: true` gives `chat.completion.chunk` events."""
    return _respond(await s.chat(request))


@router.post("/completions", response_model=oai.TextCompletion, responses=_ERRORS,
             tags=["OpenAI: completions"])
async def completions(request: oai.CompletionRequest, s: OpenAIServing = Depends(serving)) -> Any:
    """Complete one prompt (sent as one user turn through the chat template, as /generate)."""
    return _respond(await s.completion(request))


@router.post("/embeddings", response_model=oai.EmbeddingResponse, responses=_ERRORS,
             tags=["OpenAI: embeddings"])
async def embeddings(request: oai.EmbeddingRequest,
                     s: OpenAIServing = Depends(serving)) -> oai.EmbeddingResponse:
    """CLIP embeddings of texts and (extension) images, in input order."""
    return await s.embeddings(request)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                  include_in_schema=False)
async def unknown(path: str, request: Request) -> JSONResponse:
    """Anything else under /v1 (BentoML's mount would answer a plain-text 404)."""
    raise NotFoundError(f"no route {request.method} /v1/{path}")


def create_app(serving_: OpenAIServing | None = None) -> FastAPI:
    """The /v1 app; the service sets ``app.state.serving`` once its pipeline exists (tests
    pass one here)."""
    app = FastAPI(title="bento-lmm OpenAI-compatible API", version="1",
                  description=__doc__, docs_url=None, redoc_url=None)
    app.state.serving = serving_
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return json_error(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)),
                            status_code=exc.status_code)

    # LMMError and errors relayed from runners; then anything else (Starlette routes a bare
    # Exception handler through its 500 middleware, which logs it).
    app.add_exception_handler(BentoMLException, lambda _, exc: json_error(exc))
    app.add_exception_handler(Exception, lambda _, exc: json_error(exc))

    return app


app = create_app()
