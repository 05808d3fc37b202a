"""The webhook routes: an API key's endpoints (``/webhooks``) and its callback secret.

An endpoint receives the order events of its key's orders whose types it wants, signed with its
own secret; an order submitted with a ``callback_url`` has its final event sent there, signed
with the key's callback secret. Each secret is shown once, when it is made. A URL is checked
against the address policy here and again at every delivery (consumer/webhooks.py).
"""

import base64
import secrets
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from producer.problems import Problem
from producer.services import Caller, Services, ServicesDep
from shared import urls
from shared.db import FINAL
from shared.messages import new_id

router = APIRouter(tags=["webhooks"])

ENDPOINTS_PER_KEY = 20
EventType = Literal[
    "order.accepted",
    "order.processing",
    "order.retrying",
    "order.completed",
    "order.rejected",
    "order.failed",
    "order.replayed",
]
FINAL_TYPES: list[EventType] = [f"order.{s}" for s in FINAL]  # type: ignore[misc]
Url = Annotated[
    str,
    StringConstraints(min_length=1, max_length=urls.MAX_URL_LENGTH),
    Field(description="an absolute http or https URL", json_schema_extra={"format": "uri"}),
]


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def checked_url(url: str, allowed_private_hosts: str) -> str:
    """``url`` normalised, or the 422 saying why no webhook may be sent there."""
    return await urls.checked(url, urls.parse_hosts(allowed_private_hosts), urls.WEBHOOKS)


class NewEndpoint(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    url: Url
    event_types: Annotated[
        list[EventType],
        Field(min_length=1, max_length=7, description="the events wanted; default: final ones"),
    ] = FINAL_TYPES


class EndpointView(BaseModel):
    id: UUID
    url: str
    event_types: list[str]
    created_at: datetime
    failing_since: datetime | None = Field(
        description="the first failed attempt since the last delivered one"
    )
    disabled_at: datetime | None = Field(description="when it stopped receiving: see the reason")
    disabled_reason: str | None


class NewEndpointView(EndpointView):
    secret: str = Field(description="the signing secret: shown this once")


class SecretView(BaseModel):
    secret: str = Field(description="the signing secret: shown this once")
    created_at: datetime


ENDPOINT_COLUMNS = "id, url, event_types, created_at, failing_since, disabled_at, disabled_reason"

REGISTER = f"""
    INSERT INTO webhook_endpoints (id, api_key, url, event_types, secret)
    SELECT $1, $2, $3, $4, $5
     WHERE (SELECT count(*) FROM webhook_endpoints
             WHERE api_key = $2 AND deleted_at IS NULL) < $6
    RETURNING {ENDPOINT_COLUMNS}
"""


def _not_found(endpoint_id: UUID) -> Problem:
    return Problem(
        404, "Webhook not found", f"No webhook has the id {endpoint_id}.", "/problems/not-found"
    )


@router.post(
    "/webhooks",
    status_code=201,
    response_model=NewEndpointView,
    responses={
        201: {
            "links": {
                "webhook": {
                    "operationId": "get_webhook",
                    "parameters": {"endpoint_id": "$response.body#/id"},
                }
            }
        },
        409: {"description": f"the key has {ENDPOINTS_PER_KEY} webhooks already"},
        422: {"description": "invalid endpoint, unknown host or a non-public address"},
    },
)
async def register_webhook(
    endpoint: NewEndpoint, response: Response, services: ServicesDep, caller: Caller
) -> NewEndpointView:
    """Register an endpoint for this key's order events; its secret is shown only here."""
    url = await checked_url(endpoint.url, services.settings.webhook_allowed_private_hosts)
    secret = new_secret()
    types = sorted(set(endpoint.event_types))
    async with services.pool.acquire() as conn, conn.transaction():
        # one registration at a time per key, so that the limit holds
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('webhooks:' || $1))", caller)
        row = await conn.fetchrow(REGISTER, new_id(), caller, url, types, secret, ENDPOINTS_PER_KEY)
    if row is None:
        raise Problem(
            409,
            "Too many webhooks",
            f"A key may have {ENDPOINTS_PER_KEY} webhooks; delete one first.",
            "/problems/too-many-webhooks",
        )
    response.headers["Location"] = f"/webhooks/{row['id']}"
    return NewEndpointView(**dict(row), secret=secret)


@router.get("/webhooks", response_model=list[EndpointView])
async def list_webhooks(services: ServicesDep, caller: Caller) -> list[EndpointView]:
    """This key's endpoints, the disabled ones with why (no secrets)."""
    rows = await services.pool.fetch(
        f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints"
        " WHERE api_key = $1 AND deleted_at IS NULL ORDER BY created_at",
        caller,
    )
    return [EndpointView(**dict(r)) for r in rows]


async def _endpoint(pool: asyncpg.Pool, endpoint_id: UUID, caller: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints"
        " WHERE id = $1 AND api_key = $2 AND deleted_at IS NULL",
        endpoint_id,
        caller,
    )
    if row is None:  # another key's is not found either
        raise _not_found(endpoint_id)
    return row


@router.get("/webhooks/{endpoint_id:uuid}", response_model=EndpointView, responses={404: {}})
async def get_webhook(endpoint_id: UUID, services: ServicesDep, caller: Caller) -> EndpointView:
    """One of this key's endpoints."""
    return EndpointView(**dict(await _endpoint(services.pool, endpoint_id, caller)))


@router.post(
    "/webhooks/{endpoint_id:uuid}/enable",
    response_model=EndpointView,
    responses={
        404: {},
        422: {"description": "the endpoint's host is unknown now, or has a non-public address"},
    },
)
async def enable_webhook(endpoint_id: UUID, services: ServicesDep, caller: Caller) -> EndpointView:
    """Send to a disabled endpoint again, from the next event on (what it missed while disabled
    stays cancelled), with a clean slate: ``failing_since`` is cleared. Its URL is checked again,
    as at registration. An endpoint that is not disabled is left as it is, unchecked."""
    row = await _endpoint(services.pool, endpoint_id, caller)
    if row["disabled_at"] is None:
        return EndpointView(**dict(row))
    await checked_url(row["url"], services.settings.webhook_allowed_private_hosts)
    enabled = await services.pool.fetchrow(
        f"""UPDATE webhook_endpoints
               SET disabled_at = NULL, disabled_reason = NULL, failing_since = NULL
             WHERE id = $1 AND api_key = $2 AND deleted_at IS NULL
         RETURNING {ENDPOINT_COLUMNS}""",
        endpoint_id,
        caller,
    )
    if enabled is None:  # deleted meanwhile
        raise _not_found(endpoint_id)
    return EndpointView(**dict(enabled))


@router.delete("/webhooks/{endpoint_id:uuid}", status_code=204, responses={404: {}})
async def delete_webhook(endpoint_id: UUID, services: ServicesDep, caller: Caller) -> Response:
    """Stop sending to an endpoint: its pending deliveries are cancelled, its secret forgotten."""
    deleted = await services.pool.fetchval(
        """UPDATE webhook_endpoints SET deleted_at = clock_timestamp(), secret = NULL
           WHERE id = $1 AND api_key = $2 AND deleted_at IS NULL RETURNING id""",
        endpoint_id,
        caller,
    )
    if deleted is None:
        raise _not_found(endpoint_id)
    return Response(status_code=204)


@router.post("/webhooks/callback-secret", status_code=201, response_model=SecretView)
async def make_callback_secret(services: ServicesDep, caller: Caller) -> SecretView:
    """Make (or replace) the secret that signs this key's ``callback_url`` deliveries; it is
    shown only here. An order may name a ``callback_url`` once its key has one."""
    secret = new_secret()
    created = await services.pool.fetchval(
        """INSERT INTO callback_secrets (api_key, secret) VALUES ($1, $2)
           ON CONFLICT (api_key) DO UPDATE SET secret = $2, created_at = clock_timestamp()
           RETURNING created_at""",
        caller,
        secret,
    )
    return SecretView(secret=secret, created_at=created)


async def check_callback(services: Services, url: str, caller: str) -> str:
    """An order's ``callback_url`` normalised, or the 422 saying why it may not be used."""
    if not await services.pool.fetchval(
        "SELECT EXISTS (SELECT FROM callback_secrets WHERE api_key = $1)", caller
    ):
        raise Problem(
            422,
            "No callback secret",
            "Make this key's callback secret first (POST /webhooks/callback-secret): it signs"
            " what is sent to a callback_url.",
            "/problems/no-callback-secret",
        )
    return await checked_url(url, services.settings.webhook_allowed_private_hosts)
