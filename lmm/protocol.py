"""Typed IO of the native API and of the runners. Field descriptions become the OpenAPI spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

FinishReason = Literal["stop", "length", "abort"]

# The bounds of each sampling field, declared once for the engine's parameters and for both
# APIs' requests (the OpenAI ones wrap them in ``| None``).
MaxTokens = Annotated[int, Field(ge=1, description="Tokens to generate at most.")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 means greedy decoding.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus sampling mass.")]
TopK = Annotated[int, Field(ge=0, description="Keep the k most likely tokens; 0 disables.")]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0,
                                           description="HF-style repetition penalty; 1 disables.")]
Seed = Annotated[int, Field(description="Makes sampling reproducible.")]
RequestTimeout = Annotated[float, Field(
    gt=0, description="Seconds this request may take (504 past it); at most api.timeout.")]


class SamplingParams(BaseModel):
    """Per-sequence sampling; the engine honours each one inside a shared batch."""

    max_tokens: MaxTokens = 64
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Seed | None = None
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra end tokens.")
    ignore_eos: bool = False
    adapter: str | None = Field(
        None, description="The served LoRA adapter (config `adapters`) to generate with; "
        "none: the base model.")


class EngineOutput(BaseModel):
    """One step of one sequence as the LLM runner streams it."""

    token_ids: list[int] = Field(default_factory=list, description="Tokens new in this chunk.")
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = Field(None, description="The engine failed this sequence: the cause.")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Completion(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None


class GenerateResponse(BaseModel):
    """Result of /generate: the first completion's text plus every completion when n > 1."""

    model: str
    text: str = Field(description="Text of the first completion.")
    finish_reason: FinishReason | None
    completions: list[Completion]
    usage: Usage


class EmbedResponse(BaseModel):
    model: str
    dim: int
    text_embeddings: list[list[float]] = Field(description="One L2-normalized vector per text.")
    image_embeddings: list[list[float]] = Field(description="One L2-normalized vector per image.")


class ModelCard(BaseModel):
    name: str
    tag: str
    architecture: str = ""
    family: str = Field("", description="The lmm.families family serving it (chat model).")
    labels: dict[str, str] = Field(default_factory=dict)
    backend: str


class AdapterCard(ModelCard):
    """A served LoRA adapter of the LLM."""

    served_name: str = Field(description="The name requests pass as `model`.")
    parent: str = Field(description="The served model it adapts.")


class ImageLimitsInfo(BaseModel):
    max_images: int
    max_embed_images: int
    max_bytes: int
    max_pixels: int


class ModelInfo(BaseModel):
    served_model_name: str
    llm: ModelCard
    vision: ModelCard
    embedding: ModelCard
    adapters: list[AdapterCard] = Field(
        default_factory=list, description="LoRA adapters of the LLM, each a `model` of its own.")
    image_tokens: int = Field(description="Prompt tokens one image takes.")
    max_tokens_limit: int
    max_model_len: int
    max_num_seqs: int = Field(description="Sequences the LLM engine decodes together.")
    images: ImageLimitsInfo


class RunnerStats(BaseModel):
    """Counters a runner keeps about the batches it ran (for tests and dashboards)."""

    service: str
    batches: int = 0
    max_batch_size_seen: int = 0
    batch_size_histogram: dict[int, int] = Field(default_factory=dict)
    running: int = Field(0, description="Sequences in the LLM engine now (running or waiting).")


def _no_default(schema: dict) -> None:
    """Leave ``default: null`` out of the schema: Swagger UI would pre-fill the text "null"."""
    schema.pop("default", None)


class FormInput(BaseModel):
    """A request model also sent from HTML forms (Swagger UI): an empty field means "not given"."""

    @model_validator(mode="before")
    @classmethod
    def _drop_blank_fields(cls, data):
        # BentoML's multipart parser hands an empty form field over as "" (a text part) or b""
        # (Swagger UI sends non-file fields as application/json blobs); dropping it lets the
        # field's default apply (system_prompt/seed/timeout -> None, temperature -> 0.0, ...).
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if not (isinstance(v, (str, bytes)) and not v.strip())}
        return data


# Swagger UI then shows one file input of a list-of-files field at once, without "Add item".
FILE_LIST_FORM = {"example": [""]}


def _files(description: str):
    return Field(default_factory=list, description=description, json_schema_extra=FILE_LIST_FORM)


def _optional(description: str | None = None):
    return Field(None, description=description, json_schema_extra=_no_default)


class GenerateInput(FormInput):
    """Native generate request: a prompt, images (uploads or base64) and sampling parameters."""

    prompt: str = Field(description="The user's message; the model's chat template is applied.")
    model: str | None = _optional(
        "A served model name (see /model_info or GET /v1/models): the LLM, or one of its LoRA "
        "adapters; default: the LLM.")
    images: list[Path] = _files("Image files (multipart upload).")
    images_b64: list[str] = Field(
        default_factory=list, description="Images as base64 or data:image/...;base64, URLs."
    )
    system_prompt: str | None = _optional("Optional system message.")
    max_tokens: MaxTokens = 64
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Seed | None = _optional()
    stop: list[str] = Field(default_factory=list, description="Strings that end generation.")
    n: int = Field(1, ge=1, description="Completions to return for this prompt.")
    timeout: RequestTimeout | None = _optional()

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
        )


class EmbedInput(FormInput):
    """Texts and/or images to embed into the shared CLIP space."""

    texts: list[str] = Field(default_factory=list, description="Texts to embed.")
    images: list[Path] = _files("Image files (multipart upload).")
    images_b64: list[str] = Field(default_factory=list, description="Base64 or data URL images.")


class RankInput(FormInput):
    """A query (a text or an image) and candidates (texts and/or images) to order by CLIP
    similarity to it."""

    query: str | None = _optional("A text query.")
    query_image: list[Path] = _files("An image query (one file, multipart upload).")
    query_image_b64: str | None = _optional("An image query as base64 or data URL.")
    candidates: list[str] = Field(default_factory=list, description="Candidate texts.")
    candidate_images: list[Path] = _files("Candidate image files (multipart upload).")
    candidate_images_b64: list[str] = Field(default_factory=list,
                                            description="Candidate images as base64 or data URLs.")


class RankedCandidate(BaseModel):
    kind: Literal["text", "image"]
    index: int = Field(description="Position in its own candidate list.")
    text: str | None = Field(None, description="The candidate text (text candidates).")
    score: float = Field(description="Cosine similarity to the query.")


class RankResponse(BaseModel):
    model: str
    query: Literal["text", "image"] = Field(description="What the query was.")
    results: list[RankedCandidate] = Field(description="Every candidate, best first.")
