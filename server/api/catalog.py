"""The model catalog (API.md "Money controls": GET /api/v1/models) and platform admins' additions, edits and
retirements (audited in the platform log)."""

from __future__ import annotations

from aiohttp import web

from domain.catalog import CatalogModel, ModelCreate, ModelFilter, ModelList, ModelUpdate
from domain.identity import OWN
from server.http import actor, decode, json_response, query_value, routes
from server.http import container as _c

MODEL_QUERY = {
    "provider": "only this provider's models, e.g. openai",
    "search": "case-insensitive substring of the model id",
    "kind": "chat | embedding",
    "include_inactive": "platform admins: also list deactivated models",
}


@routes.get("/api/v1/models", summary="The model catalog with prices (micro-USDC per million tokens)",
            tag="catalog", response=ModelList, query=MODEL_QUERY, errors=(401, 422), key_scope=OWN)
async def list_models(request: web.Request) -> web.Response:
    f = ModelFilter(provider=query_value(request, "provider", str), search=query_value(request, "search", str),
                    kind=query_value(request, "kind", str),
                    include_inactive=bool(query_value(request, "include_inactive", bool, False)))
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.catalog.list(f))


@routes.get("/api/v1/models/{provider}/{model:.+}", summary="One catalog model", tag="catalog",
            response=CatalogModel, errors=(401, 404), key_scope=OWN)
async def get_model(request: web.Request) -> web.Response:
    model_id = f"{request.match_info['provider']}/{request.match_info['model']}"
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.catalog.resolve(model_id))


@routes.patch("/api/v1/admin/models/{provider}/{model:.+}",
              summary="Edit a model's prices, limits or availability (platform admins; audited)", tag="catalog",
              body=ModelUpdate, response=CatalogModel, errors=(401, 403, 404, 422))
async def update_model(request: web.Request) -> web.Response:
    cmd = await decode(request, ModelUpdate)
    model_id = f"{request.match_info['provider']}/{request.match_info['model']}"
    async with _c(request).uow(actor(request)) as uow:
        model = await uow.catalog.update(model_id, cmd)
    return json_response(model)


@routes.post("/api/v1/admin/models", summary="Add a model to the catalog (platform admins; audited)", tag="catalog",
             body=ModelCreate, response=CatalogModel, status=201, errors=(401, 403, 409, 422))
async def create_model(request: web.Request) -> web.Response:
    cmd = await decode(request, ModelCreate)
    async with _c(request).uow(actor(request)) as uow:
        model = await uow.catalog.create(cmd)
    return json_response(model, status=201)


@routes.delete("/api/v1/admin/models/{provider}/{model:.+}",
               summary="Retire a model: no longer callable, kept for the requests that used it (platform admins; "
                       "audited)", tag="catalog", response=CatalogModel, errors=(401, 403, 404))
async def retire_model(request: web.Request) -> web.Response:
    model_id = f"{request.match_info['provider']}/{request.match_info['model']}"
    async with _c(request).uow(actor(request)) as uow:
        model = await uow.catalog.retire(model_id)
    return json_response(model)
