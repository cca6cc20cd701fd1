"""/datasets: upload (multipart), list and show training datasets."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, UploadFile

from service.api.deps import ReadSessionDep, SessionDep, SettingsDep
from service.api.schemas.jobs import DatasetPublic
from service.api.uploads import store_upload
from service.core.capping import cap_repr
from service.core.errors import RequestError
from service.jobs import commands

router = APIRouter(prefix="/datasets", tags=["datasets"])


RESERVED_FIELDS = ("file", "format", "options")


@router.post("", status_code=201, response_model=DatasetPublic)
async def upload_dataset(
    request: Request,
    file: UploadFile,
    session: SessionDep,
    settings: SettingsDep,
    format: Annotated[str | None, Form(max_length=64)] = None,
    options: Annotated[str | None, Form(max_length=10_000)] = None,
) -> DatasetPublic:
    parsed_options = _options(options, await request.form())
    # parsed as a stream from the spooled file, in a worker thread (service/api/uploads.py); a DatasetError (the
    # upload cannot become a dataset) is a 422 invalid_dataset (service/api/errors.py)
    dataset, _ = await store_upload(request, file, session, settings, format, parsed_options)
    session.commit()
    return DatasetPublic.of(dataset)


def _options(raw: str | None, form: Any) -> dict[str, Any] | None:
    """The JSON ``options`` field merged with any other form field (``-F ticker=XAUUSD`` is an option too)."""
    value: Any = {}
    if raw:
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            problem = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise RequestError(
                422, "invalid_request", f"options is not JSON: {problem}", [{"field": "options"}]
            ) from exc
        if not isinstance(value, dict):
            raise RequestError(422, "invalid_request", "options must be a JSON object", [{"field": "options"}])
    for name, field_value in form.multi_items():
        if name in RESERVED_FIELDS:
            continue
        if name in value or not isinstance(field_value, str):
            problem = "is given twice" if name in value else "must be a plain form field, not a file"
            raise RequestError(422, "invalid_request", f"option {cap_repr(name)} {problem}", [{"field": name}])
        value[name] = field_value
    return value or None


@router.get("", response_model=list[DatasetPublic])
def list_datasets(session: ReadSessionDep) -> list[DatasetPublic]:
    return [DatasetPublic.of(d) for d in commands.list_datasets(session=session)]


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: ReadSessionDep) -> DatasetPublic:
    return DatasetPublic.of(commands.get_dataset(session=session, dataset_id=dataset_id))
