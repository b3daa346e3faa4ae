"""The JSON shapes of the API (they also document it in the OpenAPI schema at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class MatchOut(BaseModel):
    id: int
    name: str
    score: float = Field(description="similarity, higher = closer (the cosine for unit descriptors)")
    copy_: bool | None = Field(
        alias="copy", description="score ≥ the collection's copy threshold, calibrated for a false-positive rate (see "
                    "copy_decision); null until it has one"
    )
    thumbnail: str = Field(description="URL of a small JPEG of the indexed image")

    model_config = {"populate_by_name": True}


class QueryOut(BaseModel):
    query: str = Field(description="the uploaded file's name (a label)")
    k: int
    query_mode: str = Field(description="single, or dihedral: the upload searched under its 8 rotations/flips, "
                                        "each match's best score kept")
    copy_decision: str = Field(description="what `copy` means, in words: the false-positive rate the threshold "
                                           "(of this query mode) was calibrated for and the recall it kept; for a "
                                           "dihedral query on a collection without a dihedral threshold, that "
                                           "`copy` is null and how to calibrate one")
    matches: list[MatchOut]


class ReleasedOut(BaseModel):
    psnr: float | None = Field(description="dB, of the released file against the original")
    ssim: float | None
    linf: float | None = Field(description="largest change of a channel value, in 0..255 steps")
    cos_before: float | None = None
    cos_after: float | None = Field(None, description="cosine of the released file's descriptor to its target")
    scale: float | None = None
    fix: str | None = Field(None, description="none; margin: activated again with the competitor term, or "
                            "original: released unchanged, so that the file is found first unedited")
    url: str = Field(description="where to download the released file again")
    media_type: str
    data_base64: str | None = Field(None, description="the released file itself")
    activation: dict[str, Any] | None = Field(None, description="the activation configuration as run, and where "
                                                                "each knob's value came from (user, model, default)")


class AddOut(BaseModel):
    id: int
    name: str
    mode: str = Field(description="passive | activated")
    duplicate: bool = Field(description="the same bytes were already in the collection under this id")
    released: ReleasedOut | None = None
    warning: str | None = Field(default=None, description="set when the copy threshold's calibration is stale "
                                                          "after this add: recalibrate the collection")


class RemoveOut(BaseModel):
    removed: int


class ImageOut(BaseModel):
    id: int
    name: str
    sha256: str
    added: float
    mode: str
    psnr: float | None
    ssim: float | None
    linf: float | None
    released: bool
    thumbnail: str


class HealthOut(BaseModel):
    status: str
    images: int


class InfoOut(BaseModel):
    collection: dict[str, Any]
    service: dict[str, Any]
