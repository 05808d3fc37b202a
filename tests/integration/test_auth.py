"""The API wants a key for orders and crawls, limits each key's rate, and leaves probes open."""

import httpx
import pytest

from producer.auth import parse_keys
from testbed.processes import API_KEY
from tests.integration.conftest import ApiFactory

ORDER = {"customer_id": "c", "items": [{"sku": "PEN-1", "quantity": 1}]}
PROTECTED = [
    ("POST", "/orders", ORDER),
    ("POST", "/orders/batch", {"orders": [ORDER]}),
    ("GET", "/orders/00000000-0000-0000-0000-000000000000", None),
    ("PUT", "/inventory/PEN-1", {"available": 1}),
    ("GET", "/inventory/PEN-1", None),
    ("POST", "/crawls", {"url": "http://example.com/"}),
    ("GET", "/crawls/00000000-0000-0000-0000-000000000000", None),
    ("DELETE", "/crawls/00000000-0000-0000-0000-000000000000", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": API_KEY[:-1]},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"X-API-Key": ""},
    ],
)
async def test_a_missing_or_wrong_key_is_a_401_problem_and_nothing_is_stored(
    start_api: ApiFactory, conn, method: str, path: str, body: object, headers: dict[str, str]
) -> None:
    api = await start_api(demo_catalogue=True)
    async with httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url)) as bare:
        response = await bare.request(method, path, json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == 'Bearer realm="orders"'
    assert response.json()["type"] == "/problems/unauthorized"
    assert API_KEY not in response.text
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0
    assert await conn.fetchval("SELECT count(*) FROM crawls") == 0


async def test_either_header_carries_the_key_and_any_configured_key_works(
    start_api: ApiFactory,
) -> None:
    api = await start_api(demo_catalogue=True, api_keys=f"ci:{API_KEY}, second-key")
    async with httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url)) as bare:
        for headers in (
            {"X-API-Key": API_KEY},
            {"Authorization": f"Bearer {API_KEY}"},
            {"authorization": f"bearer {API_KEY}"},
            {"X-API-Key": "second-key"},
        ):
            response = await bare.post("/orders", json=ORDER, headers=headers)
            assert response.status_code == 202, (headers, response.text)


async def test_probes_stay_open_and_metrics_and_dashboard_are_configurable(
    start_api: ApiFactory,
) -> None:
    open_api = await start_api()
    locked = await start_api(metrics_need_key=True, dashboard_needs_key=True)
    for api, locked_status in ((open_api, 200), (locked, 401)):
        async with httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url)) as bare:
            assert (await bare.get("/healthz")).status_code == 200
            assert (await bare.get("/readyz")).status_code in (200, 503)  # never 401
            assert (await bare.get("/metrics")).status_code == locked_status
            assert (await bare.get("/dashboard")).status_code == locked_status
            assert (await bare.get("/dashboard/data")).status_code == locked_status
        assert (await api.get("/metrics")).status_code == 200  # with the key
        assert (await api.get("/dashboard/data")).status_code == 200


async def test_each_key_has_its_own_rate_limit_with_retry_after(start_api: ApiFactory) -> None:
    api = await start_api(
        api_keys=f"a:{API_KEY},b:other-key", rate_limit_per_second=0.5, rate_limit_burst=3
    )
    codes = [(await api.get("/inventory/NONE")).status_code for _ in range(4)]
    assert codes == [404, 404, 404, 429]
    limited = await api.get("/inventory/NONE")
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.json()["type"] == "/problems/rate-limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    other = await api.get("/inventory/NONE", headers={"X-API-Key": "other-key"})
    assert other.status_code == 404  # another key, another budget
    assert (await api.get("/healthz")).status_code == 200  # probes are never limited


async def test_the_producer_refuses_to_start_without_keys(start_api: ApiFactory) -> None:
    with pytest.raises(ValueError, match="API_KEYS is empty"):
        await start_api(api_keys="")


def test_keys_parse_with_and_without_names() -> None:
    keys = parse_keys(" ci:abc , def,ops:g:h ")
    assert list(keys) == ["ci", "key2", "ops:g"]
    with pytest.raises(ValueError, match="empty key"):
        parse_keys("name:")
